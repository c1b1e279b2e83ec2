"""The OpenAI-compatible HTTP API: request bodies (protocol) and the FastAPI app (server)."""
