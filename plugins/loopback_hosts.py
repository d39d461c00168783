"""Airflow plugin: when every client is an admin (``make run`` on loopback, no login), the API server and UI
answer only requests addressed to loopback by name (``Host: 127.0.0.1`` or ``localhost``), so a web page whose
DNS name was rebound to 127.0.0.1 cannot drive Airflow from the user's browser (DNS rebinding). With a login
(any other interface, docker-compose, Kubernetes) it adds nothing."""

import os

from airflow.plugins_manager import AirflowPlugin

LOOPBACK_NAMES = ["127.0.0.1", "localhost"]


class LoopbackHostsPlugin(AirflowPlugin):
    name = "mlfactory_loopback_hosts"
    if os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "").lower() == "true":
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        fastapi_root_middlewares = [{"name": "loopback host names only", "middleware": TrustedHostMiddleware,
                                     "kwargs": {"allowed_hosts": LOOPBACK_NAMES}}]
