"""What each command does, apart from how it is asked for and shown: one module per
command (or group) with logic of its own. Plain functions take the service or the
settings, what the command line parsed and, where the world is asked, the probe;
they return values, never print, and import no framework. adapters/cli.py parses,
calls them, renders and maps errors to exit codes; allocate, release, get and status
are the service's own operations, which MCP and HTTP call as the CLI does."""
