"""Adapters: CLI, MCP and HTTP over the same service."""
