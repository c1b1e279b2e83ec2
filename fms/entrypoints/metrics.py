"""The server's Prometheus metrics (vLLM's names under the fms: prefix), in a registry of its own."""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Buckets in seconds: time to first token spans queueing (seconds) down to one CPU-free prefill (ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FinishedRequest(NamedTuple):
    """What the histograms and counters take from one finished request (a few numbers: it travels from the
    engine process to the HTTP process instead of the whole RequestOutput)."""

    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    time_to_first_token: float | None
    latency: float | None
    mean_time_per_output_token: float | None

    @classmethod
    def of(cls, output) -> "FinishedRequest":
        """From a RequestOutput."""
        gaps = output.inter_token_latencies
        return cls(output.finish_reason, len(output.prompt_token_ids), len(output.token_ids),
                   output.time_to_first_token, output.latency, sum(gaps) / len(gaps) if gaps else None)


class _EngineGauges:
    """Gauges read at scrape time from the engine thread's last statistics snapshot."""

    def __init__(self, stats_fn, model_name: str):
        self.stats_fn, self.model_name = stats_fn, model_name

    def collect(self):
        stats = self.stats_fn()
        gauges = (
            ("fms:num_requests_running", "Requests holding pages and computed each step.", "num_running_requests"),
            ("fms:num_requests_waiting", "Requests queued for admission.", "num_waiting_requests"),
            ("fms:num_requests_pending", "Requests submitted but not yet running (bounded by --max-waiting).",
             "num_pending_requests"),
            ("fms:kv_cache_used_pages", "KV-cache pages held by running requests.", "num_used_pages"),
            ("fms:kv_cache_free_pages", "KV-cache pages free.", "num_free_pages"),
            ("fms:kv_cache_cached_pages", "KV-cache pages kept by the prefix cache.", "num_cached_pages"),
            ("fms:kv_cache_total_pages", "KV-cache pages in the pool.", "num_pages"),
            ("fms:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens queried.",
             "prefix_cache_hit_rate"),
        )
        for name, doc, key in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield family
        # the engine's own totals since it started, so that a load test can split a run's time the way the offline
        # engine's stats() does (scripts/bench_server_vs_offline.py reads them before and after each run)
        counters = (
            ("fms:engine_steps", "Engine steps run.", "num_steps"),
            ("fms:engine_decode_windows", "Multi-step decode windows run.", "num_decode_windows"),
            ("fms:engine_batched_tokens", "Tokens computed by engine steps (prefill and decode).", "num_batched_tokens"),
        )
        for name, doc, key in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield family
        family = CounterMetricFamily("fms:engine_time_seconds", "Engine wall time by phase: schedule, execute, update "
                                     "(and, inside execute, decode windows' launch and wait).",
                                     labels=["model_name", "phase"])
        for phase, seconds in sorted((stats.get("time_s") or {}).items()):
            family.add_metric([self.model_name, phase], float(seconds))
        yield family


class ServerMetrics:
    def __init__(self, model_name: str, stats_fn):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("fms:time_to_first_token_seconds", "Arrival to first output token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("fms:time_per_output_token_seconds", "Mean time between output tokens per request.",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("fms:e2e_request_latency_seconds", "Arrival to last output token.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("fms:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("fms:generation_tokens", "Output tokens of finished requests.", labels,
                                         registry=self.registry)
        self.finished = Counter("fms:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.registry.register(_EngineGauges(stats_fn, model_name))

    def on_finish(self, output) -> None:
        """Record one finished request (a RequestOutput); called on the engine thread."""
        self.record(FinishedRequest.of(output))

    def record(self, finished: FinishedRequest) -> None:
        """Record one finished request (in the HTTP process when the engine runs in a process of its own)."""
        name = self.model_name
        self.finished.labels(name, finished.finish_reason or "unknown").inc()
        self.prompt_tokens.labels(name).inc(finished.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(finished.num_output_tokens)
        if finished.time_to_first_token is not None:
            self.ttft.labels(name).observe(finished.time_to_first_token)
        if finished.latency is not None and finished.num_output_tokens:
            self.e2e.labels(name).observe(finished.latency)
        if finished.mean_time_per_output_token is not None:
            self.tpot.labels(name).observe(finished.mean_time_per_output_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
