"""Prometheus metrics under TGI's names, on a registry of their own.

prometheus-client renames every counter `<name>_total`; TGI's dashboards query the bare names
(`tgi_request_count`), so counters here are exposed as untyped samples under exactly those names.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class ExactNameCounter:
    """A monotonic counter, with labels, exposed under its exact name."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
        self._lock = threading.Lock()
        registry.register(self)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "unknown")
        with self._lock:
            for labels, value in self._values.items():
                metric.add_sample(self.name, dict(labels), value)
        yield metric


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def counter(name: str, doc: str) -> ExactNameCounter:
            return ExactNameCounter(name, doc, registry)

        def histogram(name: str, doc: str, buckets=_DURATION_BUCKETS, labels=()) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.request_count = counter("tgi_request_count", "Requests received")
        self.request_success = counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = counter("tgi_request_failure", "Failed requests, by error type")
        self.request_duration = histogram("tgi_request_duration", "End-to-end request seconds")
        self.request_queue_duration = histogram(
            "tgi_request_queue_duration", "Seconds from queueing to the first batch"
        )
        self.request_validation_duration = histogram(
            "tgi_request_validation_duration", "Validation and tokenization seconds"
        )
        self.request_inference_duration = histogram(
            "tgi_request_inference_duration", "Seconds from the first batch to the last token"
        )
        self.request_mean_time_per_token_duration = histogram(
            "tgi_request_mean_time_per_token_duration", "Inference seconds per generated token"
        )
        self.request_input_length = histogram(
            "tgi_request_input_length", "Prompt tokens", _TOKEN_BUCKETS
        )
        self.request_generated_tokens = histogram(
            "tgi_request_generated_tokens", "Generated tokens", _TOKEN_BUCKETS
        )
        self.request_max_new_tokens = histogram(
            "tgi_request_max_new_tokens", "max_new_tokens of validated requests", _TOKEN_BUCKETS
        )
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Requests in the running batch", registry=registry
        )
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens",
            "Token budget held by the running batch",
            registry=registry,
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=registry)
        self.kv_blocks_free = Gauge(
            "shardline_kv_blocks_free", "Free KV cache blocks on the last shard", registry=registry
        )
        self.kv_blocks_total = Gauge(
            "shardline_kv_blocks_total", "KV cache blocks on the last shard", registry=registry
        )
        self.kv_blocks_cached = Gauge(
            "shardline_kv_blocks_cached",
            "KV cache blocks in the last shard's prefix-cache index (evictable ones count as free)",
            registry=registry,
        )
        self.batch_next_size = histogram(
            "tgi_batch_next_size", "Requests in each new prefill batch", _TOKEN_BUCKETS
        )
        self.batch_concat = counter("tgi_batch_concat", "New batches joined to the running one")
        self.prefix_cache_queries = counter(
            "tgi_prefix_cache_queries", "Prompt tokens looked up in the shards' prefix cache"
        )
        self.prefix_cache_hits = counter(
            "tgi_prefix_cache_hits", "Prompt tokens found in the shards' prefix cache"
        )
        self.batch_inference_count = counter("tgi_batch_inference_count", "Shard steps, by method")
        self.batch_steps_overlapped = counter(
            "shardline_batch_steps_overlapped",
            "Shard steps sent while another batch's step was in flight (pipeline parallelism)",
        )
        self.batch_inference_success = counter(
            "tgi_batch_inference_success", "Successful shard steps, by method"
        )
        self.batch_inference_failure = counter(
            "tgi_batch_inference_failure", "Failed shard steps, by method"
        )
        self.batch_inference_duration = histogram(
            "tgi_batch_inference_duration", "Seconds per shard step", labels=("method",)
        )
        self.batch_forward_duration = histogram(
            "tgi_batch_forward_duration", "Forward seconds per shard step", labels=("method",)
        )
        self.batch_decode_duration = histogram(
            "tgi_batch_decode_duration", "Token decoding seconds per shard step", labels=("method",)
        )
        self.batch_filter_duration = histogram(
            "tgi_batch_filter_duration", "FilterBatch seconds", labels=("method",)
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
