"""The `azure` backend's console links: Azure ML studio's page of a job (a command job, a batch endpoint's
job) and of an online endpoint, in the pipeline's workspace."""

from __future__ import annotations

from urllib.parse import quote

STUDIO = "https://ml.azure.com"


def _workspace(settings) -> str:
    return (f"wsid=/subscriptions/{settings.subscription_id}/resourcegroups/{settings.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{settings.workspace}")


def job(settings, name: str) -> str:
    return f"{STUDIO}/runs/{quote(name)}?{_workspace(settings)}"


def online_endpoint(settings, name: str) -> str:
    return f"{STUDIO}/endpoints/realtime/{quote(name)}/detail?{_workspace(settings)}"
