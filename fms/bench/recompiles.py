"""Dynamo's graphs and recompiles, recorded while an engine starts or a benchmark runs.

Module top level imports only the standard library: fms.bench.startup's child imports it before it times its own
import of torch."""

import logging


class RecompileLog(logging.Handler):
    """Dynamo's recompile messages (its `recompiles` log artifact) between start() and stop(): the function and the
    first guard that failed, one entry each. Each entry is a compile that a shape bucket paid for again."""

    LOGGER = "torch._dynamo.guards.__recompiles"

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.entries: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        if lines:  # "Recompiling function f in file:line", "triggered by ...", "- guard ..."
            guard = next((line for line in lines[1:] if line.startswith("- ")), "")
            self.entries.append(f"{lines[0]} {guard}".strip())

    def start(self) -> "RecompileLog":
        import torch

        torch._logging.set_logs(recompiles=True)
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self)
        self._propagate, logger.propagate = logger.propagate, False  # recorded here, not printed
        return self

    def stop(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.propagate = self._propagate

    def snapshot(self) -> dict:
        """What a JSON records: dynamo's graphs so far in this process and the recompiles seen so far."""
        return {"graphs_traced": dynamo_graphs(), "recompiles": list(self.entries)}

    def since(self, before: dict) -> dict:
        """The graphs traced and recompiles since an earlier snapshot (graphs None without dynamo)."""
        now = self.snapshot()
        graphs = None if now["graphs_traced"] is None else now["graphs_traced"] - before["graphs_traced"]
        return {"graphs_traced": graphs, "recompiles": now["recompiles"][len(before["recompiles"]):]}

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()


def dynamo_graphs() -> int | None:
    """How many graphs dynamo has traced in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return counters["stats"]["unique_graphs"]
