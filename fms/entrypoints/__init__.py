"""Front ends above the engine: the `fms` command, the OpenAI-compatible server and the load generator."""
