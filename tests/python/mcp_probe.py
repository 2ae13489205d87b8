"""An MCP client (the real `mcp` SDK) for the end-to-end tests: lists tools, calls some, and
prints one JSON line with what happened, so the Rust test can assert on it.

Usage: mcp_probe.py URL MODE TOOL_CALL...
MODE: legacy (2025-11-25 initialize handshake) or a modern version (2026-07-28).
TOOL_CALL: name=JSON-arguments, e.g. add={"a":1,"b":2}
"""

import asyncio
import json
import sys

from mcp import Client


async def main() -> None:
    url, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3:]
    report: dict = {"calls": {}}
    async with Client(url, mode=mode) as client:
        tools = await client.list_tools()
        report["tools"] = sorted(tool.name for tool in tools.tools)
        for call in calls:
            name, _, arguments = call.partition("=")
            progress: list = []

            async def on_progress(done, total, message, progress=progress):
                progress.append(done)

            try:
                result = await client.call_tool(
                    name, json.loads(arguments or "{}"), progress_callback=on_progress
                )
                text = [part.text for part in result.content if hasattr(part, "text")]
                report["calls"][name] = {
                    "ok": not result.is_error,
                    "text": text,
                    "progress": progress,
                }
            except Exception as error:  # the test asserts on the message
                report["calls"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(report), flush=True)


asyncio.run(main())
