"""An MCP server written only with the official SDK (no athanor), for the agent's client tests."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("shout")


@server.tool(description="The text in capitals, with an exclamation mark.")
def shout(text: str) -> str:
    return text.upper() + "!"


@server.tool(description="Always fails.")
def broken() -> str:
    raise ValueError("broken on purpose")


if __name__ == "__main__":
    server.run("stdio")
