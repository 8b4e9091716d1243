"""The control socket: a running wrapguard's state and its bypass list, over HTTP/1.1 on a
private unix socket (compat.md, "Control socket"; docs/control.md).

- `server.py`: `await start(service, path)` serves GET /state, GET|POST|DELETE /bypass and
  GET /metrics (Prometheus text), for our own uid (and root) only;
- `paths.py`: the default socket path, and finding a running one;
- `show.py`: `wrapguard show`, the state printed as `wg show` does.
"""
