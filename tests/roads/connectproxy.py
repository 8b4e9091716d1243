"""A minimal HTTP CONNECT proxy (h11) for the HTTPS_PROXY tests: `python connectproxy.py PORT`
listens on 127.0.0.1:PORT, prints "listening", then one line per tunnel: "CONNECT host:port"."""

from __future__ import annotations

import asyncio
import sys

import h11


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while (ev := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        if not isinstance(ev, h11.Request) or ev.method != b"CONNECT":
            writer.close()
            return
        target = ev.target.decode()
        print("CONNECT", target, flush=True)
        host, _, port = target.rpartition(":")
        up_r, up_w = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(conn.send(h11.Response(status_code=200, headers=[])))
        early = conn.trailing_data[0]
        if early:
            up_w.write(early)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)
    except (OSError, h11.ProtocolError):
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
