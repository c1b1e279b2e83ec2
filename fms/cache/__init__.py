"""KV-cache state: specs, the page allocator, the KV manager (sole host owner of pages, state slots and
prefix hits), the device pools and per-step metadata."""
