"""The MCP face: work orders as tools for coding agents (`tools.py`), over stdio (`mendloop mcp`) or mounted in
`serve` at `/mcp` (`http.py`)."""
