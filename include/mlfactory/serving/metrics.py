"""The server's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations



class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mlfactory_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("mlfactory_request_latency_seconds", "request latency by route", ["route"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.rows = Counter("mlfactory_predicted_rows", "rows predicted", ["variant", "version"], registry=self.registry)
        self.model_errors = Counter("mlfactory_model_errors", "predict calls where the model raised", ["variant", "version"],
                                    registry=self.registry)
        self.model = Gauge("mlfactory_model_version", "1 for each (variant, version) loaded; the weight is its traffic share",
                           ["variant", "version", "model_uri"], registry=self.registry)
        self.weight = Gauge("mlfactory_variant_weight", "traffic weight of each variant", ["variant"], registry=self.registry)
        self.log_dropped = Gauge("mlfactory_prediction_log_dropped_rows", "rows the prediction log could not keep",
                                 registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
