"""An MCP tool server (the real `mcp` SDK, Streamable HTTP) for the end-to-end tests.

Usage: mcp_tools_server.py PORT [--stateless]
Tools: add(a, b), search(query), delete_everything(), count_slowly(n) (streams progress).
"""

import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

server = MCPServer("e2e-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


@server.tool()
def search(query: str) -> str:
    """Pretends to search."""
    return f"results for {query}"


@server.tool()
def delete_everything() -> str:
    """A tool policy should keep callers away from."""
    return "everything deleted"


@server.tool()
async def count_slowly(n: int, ctx: Context) -> int:
    """Reports progress n times, then returns n."""
    for step in range(1, n + 1):
        await ctx.report_progress(step, n)
    return n


if __name__ == "__main__":
    port = int(sys.argv[1])
    server.run(
        "streamable-http",
        host="127.0.0.1",
        port=port,
        stateless_http="--stateless" in sys.argv,
        # The mesh routes by registry host names; the test owns every name it uses.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
