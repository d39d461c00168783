"""The `local` backend (the default): this machine is the cloud.

| concern | how |
|---|---|
| bucket | a folder (``file://``) |
| bucket events | ``StoragePrefixPollTrigger``: lists the landing folder every ``ingest.poll_interval_s`` |
| training | torchrun with N processes, a child of the Airflow task (``LocalTrainingOperator``) |
| real-time endpoint | one model server process on ``127.0.0.1:local.port`` with blue/green variants (``endpoint``, ``rollout``) |
| batch scoring | chunked Arrow scoring in the Airflow task (``scoring``) |

Its Airflow side is ``mlfactory_airflow.backends.local``; ``make run`` (``run``) tells the whole story on it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlfactory.backend_registry import Backend, BackendSettings


class LocalSettings(BackendSettings):
    """Section ``local:`` of the pipeline config (every field has a default: the section may be left out)."""

    name: Literal["local"] = "local"
    port: int = Field(8090, ge=1, le=65535, description="the local endpoint's port (on 127.0.0.1)")
    admin_port: int | None = Field(None, ge=1, le=65535,
                                   description="its admin API's port (on 127.0.0.1: only ml_deploy calls it); "
                                               "empty: port + 1")
    token: str = Field("", description="the endpoint's client (predict-only) bearer token; empty: one is generated and "
                                       "kept (mode 600) in the bucket's _mlfactory/endpoint/token")
    admin_token: str = Field("", description="the admin API's token (ml_deploy's, never a client's); empty: one is "
                                             "generated and kept (mode 600) in _mlfactory/endpoint/admin-token")
    endpoint_url: str = Field("",
                              description="a model server run by someone else (docker-compose's model-server, a "
                                          "Kubernetes Service), e.g. http://model-server:8080: ml_deploy drives it "
                                          "through its admin API (admin_url) and never starts one; empty: a process "
                                          "on 127.0.0.1:port, started on first deploy")
    admin_url: str = Field("", description="that server's admin API (with endpoint_url), e.g. http://model-server:8081")

    @field_validator("endpoint_url", "admin_url", mode="before")
    @classmethod
    def _endpoint_url(cls, value, info):
        url = "" if value is None else str(value).rstrip("/")
        if url and not re.fullmatch(r"https?://[^/\s]+", url):
            raise ValueError(f"{url!r} is not http(s)://host:port (no path), e.g. http://model-server:"
                             f"{8081 if info.field_name == 'admin_url' else 8080}")
        return url

    @field_validator("token", "admin_token", mode="before")
    @classmethod
    def _token(cls, value, info):
        from mlfactory.serving.auth import check_token

        token = "" if value is None else str(value)  # `token: ${UNSET:-}` reads as YAML null
        return check_token(token, f"local.{info.field_name}") if token else ""

    @model_validator(mode="after")
    def _admin(self):
        if bool(self.endpoint_url) != bool(self.admin_url):
            raise ValueError("local.endpoint_url and local.admin_url go together: the server's public URL and its "
                             "admin API's (e.g. http://model-server:8080 and http://model-server:8081)")
        if self.token and self.token == self.admin_token:
            raise ValueError("local.token and local.admin_token must differ: clients must not hold the admin credential")
        if self.admin_port == self.port:
            raise ValueError(f"local.admin_port must differ from local.port ({self.port})")
        return self

    @property
    def admin_listen_port(self) -> int:
        return self.admin_port or (self.port + 1 if self.port < 65535 else self.port - 1)


BACKEND = Backend("local", LocalSettings, airflow="mlfactory_airflow.backends.local:LocalBackend",
                  runtime="mlfactory.backends.local.runtime")
