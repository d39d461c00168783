"""Vertex AI clients on the google provider's credentials: one place that makes them, for operators and
triggers alike.

The provider's Vertex hooks build gRPC clients for the regional endpoint; these are the same
``aiplatform_v1`` clients over REST (``transport="rest"``), with the connection's credentials
(``GoogleBaseHook``: key file, workload identity, impersonation, or anonymous for an emulator) and the
API host from ``gcp.api_endpoint`` (default ``REGION-aiplatform.googleapis.com``). One transport
everywhere means the requests a test sends to a local fake are the requests Google receives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SERVICES = {"job": "JobServiceClient", "endpoint": "EndpointServiceClient", "model": "ModelServiceClient",
            "prediction": "PredictionServiceClient"}


@dataclass(frozen=True)
class VertexConnection:
    """What a client needs, small enough to travel in a trigger's serialized kwargs."""

    conn_id: str
    region: str
    api_endpoint: str = ""

    @classmethod
    def of(cls, settings) -> VertexConnection:
        return cls(settings.conn_id, settings.region, settings.api_endpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    def client(self, service: str):
        """An aiplatform_v1 client of ``service`` (job, endpoint, model, prediction)."""
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
        from google.cloud import aiplatform_v1

        credentials = GoogleBaseHook(gcp_conn_id=self.conn_id).get_credentials()
        host = self.api_endpoint or f"{self.region}-aiplatform.googleapis.com"
        return getattr(aiplatform_v1, SERVICES[service])(credentials=credentials, transport="rest",
                                                         client_options={"api_endpoint": host})


def not_found(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None when Vertex answers 404."""
    from google.api_core.exceptions import NotFound

    try:
        return call(*args, **kwargs)
    except NotFound:
        return None
