"""The `gcp` backend's console links: the Google Cloud console's Vertex AI page of a custom job, a batch
prediction job and an endpoint (as the google provider's Vertex AI links)."""

from __future__ import annotations

CONSOLE = "https://console.cloud.google.com/vertex-ai/locations"


def _page(settings, kind: str, resource: str, tab: str = "") -> str:
    """``resource``: the resource's full name (``projects/.../<kind>/<id>``) or its id."""
    return f"{CONSOLE}/{settings.region}/{kind}/{resource.rsplit('/', 1)[-1]}{tab}?project={settings.project}"


def custom_job(settings, name: str) -> str:
    return _page(settings, "training", name, "/cpu")


def batch_prediction_job(settings, name: str) -> str:
    return _page(settings, "batch-predictions", name)


def endpoint(settings, name: str) -> str:
    return _page(settings, "endpoints", name)
