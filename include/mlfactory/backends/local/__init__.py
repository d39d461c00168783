"""The `local` backend (the default): this machine is the cloud.

| concern | how |
|---|---|
| bucket | a folder (``file://``) |
| bucket events | ``LocalBucketChangeTrigger``: lists the landing folder every ``ingest.poll_interval_s`` |
| training | torchrun with N processes, a child of the Airflow task (``LocalTrainingOperator``) |
| real-time endpoint | one model server process on ``127.0.0.1:local.port`` with blue/green variants (``endpoint``, ``rollout``) |
| batch scoring | chunked Arrow scoring in the Airflow task (``scoring``) |

Its Airflow side is ``mlfactory_airflow.backends.local``; ``make run`` (``run``) tells the whole story on it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from mlfactory.backends import Backend, BackendSettings


class LocalSettings(BackendSettings):
    """Section ``local:`` of the pipeline config (every field has a default: the section may be left out)."""

    name: Literal["local"] = "local"
    port: int = Field(8090, ge=1, le=65535, description="the local endpoint's port (on 127.0.0.1)")
    token: str = Field("", description="the endpoint's bearer token; empty: one is generated and kept (mode 600) in "
                                       "the bucket's _mlfactory/endpoint/")
    endpoint_url: str = Field("",
                              description="a model server run by someone else (docker-compose's model-server, a "
                                          "Kubernetes Service), e.g. http://model-server:8080: ml_deploy drives it "
                                          "through its admin API and never starts one; empty: a process on "
                                          "127.0.0.1:port, started on first deploy")

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _endpoint_url(cls, value):
        url = "" if value is None else str(value).rstrip("/")
        if url and not re.fullmatch(r"https?://[^/\s]+", url):
            raise ValueError(f"{url!r} is not http(s)://host:port (no path), e.g. http://model-server:8080")
        return url

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token(cls, value):
        return "" if value is None else value  # `token: ${UNSET:-}` reads as YAML null


BACKEND = Backend("local", LocalSettings, airflow="mlfactory_airflow.backends.local:LocalBackend")
