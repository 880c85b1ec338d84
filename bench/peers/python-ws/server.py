"""Comparison peer for roomcast benchmarks: the classic single-process Python
`websockets` broadcast server. One asyncio process, no Redis, rooms in memory.

A client connects to ws://HOST:PORT/<room> (the path without the leading slash,
query string ignored). Every text or binary frame a client sends goes, same type
and bytes, to every client in that room, the sender included.
"""

import asyncio
import os
import signal

import websockets
from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosedError

HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "9091"))

ROOMS: dict[str, set] = {}  # room -> connections in it


async def handler(ws):
    room = ws.request.path.partition("?")[0][1:]
    clients = ROOMS.setdefault(room, set())
    clients.add(ws)
    try:
        async for message in ws:  # str for text frames, bytes for binary ones
            broadcast(clients, message)
    except ConnectionClosedError:
        pass  # the client went away without a closing handshake
    finally:
        clients.discard(ws)
        if not clients:
            del ROOMS[room]


async def main():
    # compression=None: like the node-ws peer (perMessageDeflate off).
    async with serve(handler, HOST, PORT, compression=None) as server:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)
        loop.add_signal_handler(signal.SIGINT, server.close)
        print(f"python-ws (websockets {websockets.__version__}) listening on "
              f"ws://{HOST}:{PORT}/<room>", flush=True)
        await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
