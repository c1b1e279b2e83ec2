"""A streaming /v1/completions request in a background thread, for tests that act on a server while a request is in
flight (kill the engine process, SIGTERM the command): its parsed SSE chunks, and an event set at the first one."""

import json
import threading


def stream_in_background(url: str, body: dict, timeout_s: float):
    """Start POST url/v1/completions with body (stream: true) in a thread -> (thread, chunks, started)."""
    import httpx

    chunks, started = [], threading.Event()

    def run():
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, chunks, started
