"""The TUN add-on: `wrapguard up`, the whole host through the tunnel (root; docs/tun.md).

A separate privileged shape beside the root-free core: the kernel's own TCP/IP makes the
packets, a TUN device hands them to the same `tunnel.Device` and `WgUdpRuntime` the netstack
engine uses (runtime/engine.py `build_device`, `PeerChooser`); the netstack is not involved.
`tundev` opens the device, `netconf` owns every link, address and route it makes (marked and
recorded so that a later run removes what a killed one left), `engine` moves packets and keeps
the bypass routes, `up` is the command.
"""
