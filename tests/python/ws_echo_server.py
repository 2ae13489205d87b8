"""A WebSocket echo server (the real `websockets` library) for the end-to-end tests.

Usage: ws_echo_server.py PORT LOG_FILE
Greets each connection with "hello <request path>", then echoes every message (text or
binary) as it came. When a connection ends it appends a line to LOG_FILE:
"closed <code> <reason> <messages echoed>", so the test can check the close handshake reached
the server intact.
"""

import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def main() -> None:
    port, log_file = int(sys.argv[1]), sys.argv[2]

    async def echo(connection) -> None:
        echoed = 0
        await connection.send(f"hello {connection.request.path}")
        try:
            async for message in connection:
                await connection.send(message)
                echoed += 1
        except ConnectionClosed:
            pass
        code = connection.close_code
        reason = connection.close_reason or "-"
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(f"closed {code} {reason} {echoed}\n")

    async with serve(echo, "127.0.0.1", port, max_size=None, compression=None) as server:
        await server.serve_forever()


asyncio.run(main())
