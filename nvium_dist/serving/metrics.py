"""Prometheus metrics of the server (GET /metrics), on a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, exit_layers: list[int]):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # resident memory, open file descriptors, CPU seconds
        self.requests = Counter("nvium_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("nvium_prompt_tokens", "prompt tokens admitted", registry=registry)
        self.generated_tokens = Counter("nvium_generated_tokens", "tokens sampled", registry=registry)
        self.queue_depth = Gauge("nvium_queue_depth", "requests waiting for a row", registry=registry)
        self.active_rows = Gauge("nvium_active_rows", "rows decoding a sequence", registry=registry)
        self.occupancy = Gauge("nvium_batch_occupancy", "active rows / --max-batch", registry=registry)
        self.tick_rows = Histogram("nvium_tick_rows", "rows with a token to decide in each engine tick",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.ttft = Histogram("nvium_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("nvium_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.exit_layer = Histogram("nvium_exit_layer", "layer at which each sampled token exited",
                                    buckets=[float(layer) for layer in exit_layers], registry=registry)
        self.mean_exit_layer = Gauge("nvium_mean_exit_layer", "mean exit layer of the sampled tokens",
                                     registry=registry)
        self.speedup = Gauge("nvium_speedup_over_full_depth",
                             "layer reads full depth would spend on the tokens sampled / layer reads spent",
                             registry=registry)
        self._exit_sum = 0.0
        self._exit_count = 0

    def token(self, first: bool, seconds: float, exit_layer: int | None) -> None:
        self.generated_tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)
        if exit_layer is not None:
            self.exit_layer.observe(exit_layer)
            self._exit_sum += exit_layer
            self._exit_count += 1
            self.mean_exit_layer.set(self._exit_sum / self._exit_count)

    def gauges(self, queue_depth: int, active: int, max_batch: int, speedup: float) -> None:
        self.queue_depth.set(queue_depth)
        self.active_rows.set(active)
        self.occupancy.set(active / max_batch)
        self.speedup.set(speedup)

    def render(self) -> bytes:
        return generate_latest(self.registry)
