"""A WebSocket client (the real `websockets` library) for the end-to-end tests: talks to
ws_echo_server.py and prints one JSON line with what happened, so the Rust test can assert on
it.

Usage: ws_probe.py URL
Reads the greeting, sends 100 text messages back to back and reads their echoes, sends one
1 MiB binary message and compares the echo's SHA-256, then closes with code 1000 "done".
"""

import asyncio
import hashlib
import json
import os
import sys

from websockets.asyncio.client import connect

TEXT_MESSAGES = 100
BINARY_SIZE = 1024 * 1024


async def main() -> None:
    url = sys.argv[1]
    report: dict = {}
    async with asyncio.timeout(30):
        connection = await connect(url, proxy=None, max_size=None, compression=None)
        report["greeting"] = await connection.recv()
        for index in range(TEXT_MESSAGES):
            await connection.send(f"message {index}")
        report["texts"] = [await connection.recv() for _ in range(TEXT_MESSAGES)]
        payload = os.urandom(BINARY_SIZE)
        await connection.send(payload)
        echo = await connection.recv()
        report["binary"] = {
            "type": type(echo).__name__,
            "length": len(echo),
            "intact": hashlib.sha256(echo).digest() == hashlib.sha256(payload).digest(),
        }
        await connection.close(code=1000, reason="done")
        report["close"] = {"code": connection.close_code, "reason": connection.close_reason}
    print(json.dumps(report), flush=True)


asyncio.run(main())
