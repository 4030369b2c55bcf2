"""The agent harness: a model on any OpenAI-compatible endpoint works in a directory of files with tools.

- tools.py: the agent's own tools (sandboxed bash and Python, read / write / edit file, search);
- protocol.py: tool calls in the OpenAI `tools`/`tool_calls` format, or a text protocol for small models;
- loop.py: the loop, its limits, context management, and the resumable trajectory;
- mcp_client.py / mcp_server.py: tools of MCP servers for the agent; athanor's tools as an MCP server.
"""
