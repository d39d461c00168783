"""sagemaker-runtime's InvokeEndpoint for moto's endpoints, played on this machine (moto answers
InvokeEndpoint with canned results and runs no container).

Each request is routed as SageMaker routes it: to ``TargetVariant`` if given, else to a variant drawn
by the variants' current weights (what UpdateEndpointWeightsAndCapacities set in moto). Each
SageMaker Model runs as one container: the project's model server (``python -m mlfactory.serving``)
with the Model's Environment, started on the first request and answering on /invocations. What a
container answers goes back as SageMaker's runtime sends it: its body and
``X-Amzn-Invoked-Production-Variant``; a 4xx/5xx, no answer within ``timeout_s`` (SageMaker's 60 s)
or a dead container is a ``ModelError`` (424) naming the variant.

``hang(model)`` freezes a model's container (SIGSTOP: it takes connections and never answers, as a
deadlocked model does). moto has no UpdateEndpoint: ``update_endpoint`` plays its outcome once the
request passes botocore's validation (see its docstring).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import boto3
from conftest import serving_container
from loopback_http import LoopbackServer

from mlfactory.backends.local.processes import answers, free_port, signal_group, stop_group


class SageMakerRuntime:
    def __init__(self, moto_url: str, workdir: Path, environment: dict | None = None, timeout_s: float = 60):
        self.sagemaker = boto3.client("sagemaker", endpoint_url=moto_url, region_name="us-east-1")
        self.workdir, self.environment, self.timeout_s = workdir, environment or {}, timeout_s
        self.containers: dict[str, tuple[subprocess.Popen, str]] = {}
        self.invocations: list[dict] = []  # {"endpoint", "target", "variant", "status"} of every request
        self.updates: list[dict] = []  # the UpdateEndpoint requests played
        self.hung: set[str] = set()  # the models whose container is frozen
        self.lock = threading.Lock()
        runtime = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                runtime.handle(self)

            def log_message(self, *args):
                pass

        self.http = LoopbackServer(Handler).start()
        self.url = self.http.url

    # -- routing -------------------------------------------------------------------------------------

    def route(self, endpoint: str, target: str | None) -> tuple[str, str]:
        """(variant, SageMaker Model) for one request."""
        described = self.sagemaker.describe_endpoint(EndpointName=endpoint)
        config = self.sagemaker.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
        models = {v["VariantName"]: v["ModelName"] for v in config["ProductionVariants"]}
        if target:
            if target not in models:
                raise LookupError(f"Variant {target} not found for endpoint {endpoint}")
            return target, models[target]
        weights = {v["VariantName"]: float(v.get("CurrentWeight", 0)) for v in described["ProductionVariants"]}
        live = {name: w for name, w in weights.items() if w > 0}
        if not live:
            raise LookupError(f"endpoint {endpoint} has no variant with weight > 0")
        variant = random.choices(list(live), weights=list(live.values()))[0]
        return variant, models[variant]

    def container(self, model: str) -> str:
        """The URL of ``model``'s container, started on first use."""
        with self.lock:
            if model in self.containers:
                return self.containers[model][1]
            environment = self.sagemaker.describe_model(ModelName=model)["PrimaryContainer"].get("Environment", {})
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFACTORY_"))}
            env.update(environment, **self.environment)
            self.workdir.mkdir(parents=True, exist_ok=True)
            url = f"http://127.0.0.1:{port}"
            log = self.workdir / f"{model}.log"
            process = serving_container(env, log, lambda: answers(url + "/ping", ok_only=True),
                                        f"the container of {model}", ("--host", "127.0.0.1", "--port", str(port)))
            self.containers[model] = (process, url)
            if model in self.hung:
                signal_group(process, signal.SIGSTOP)
            return url

    def hang(self, model: str) -> None:
        """Freeze ``model``'s container (now, or once it is up): it keeps its socket and never answers."""
        with self.lock:
            self.hung.add(model)
            if model in self.containers:
                signal_group(self.containers[model][0], signal.SIGSTOP)

    # -- HTTP -----------------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = request.path.strip("/").split("/")
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if len(parts) != 3 or parts[0] != "endpoints" or parts[2] != "invocations":
            return self.reply(request, 404, {"message": f"no route {request.path}"}, error="UnknownOperationException")
        endpoint, target = parts[1], request.headers.get("X-Amzn-SageMaker-Target-Variant")
        record = {"endpoint": endpoint, "target": target, "variant": None, "status": None}
        self.invocations.append(record)
        try:
            variant, model = self.route(endpoint, target)
        except Exception as err:  # noqa: BLE001 - SageMaker's answer to an unknown endpoint or variant
            record["status"] = 400
            return self.reply(request, 400, {"message": str(err)}, error="ValidationError")
        record["variant"] = variant
        forwarded = urllib.request.Request(self.container(model) + "/invocations", data=body, method="POST", headers={
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            "Accept": request.headers.get("Accept", "application/json")})
        try:
            with urllib.request.urlopen(forwarded, timeout=self.timeout_s) as answer:
                record["status"] = 200
                return self.reply(request, 200, answer.read(), variant=variant,
                                  content_type=answer.headers.get("Content-Type", "application/json"))
        except urllib.error.HTTPError as err:
            status, message = err.code, err.read().decode(errors="replace")[:1000]
        except OSError as err:  # no answer in time, or the container is gone
            status, message = 0, f"no answer within {self.timeout_s:g}s ({err})"
        record["status"] = 424
        self.reply(request, 424, {"message": f"Received server error ({status}) from {variant} with message "
                                             f"\"{message}\"", "OriginalStatusCode": status,
                                  "OriginalMessage": message}, error="ModelError")

    @staticmethod
    def reply(request, status: int, body, variant: str | None = None, error: str | None = None,
              content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        if variant:
            request.send_header("X-Amzn-Invoked-Production-Variant", variant)
        if error:
            request.send_header("x-amzn-ErrorType", error)
        request.end_headers()
        request.wfile.write(data)

    # -- UpdateEndpoint ---------------------------------------------------------------------------------

    def update_endpoint(self, **request) -> dict:
        """What a successful blue/green UpdateEndpoint leaves (moto has no UpdateEndpoint): the request checked
        against botocore's model of it, then the endpoint in service on the new config with its initial weights
        (moto's endpoint re-created on it)."""
        from botocore.validate import ParamValidator

        model = self.sagemaker.meta.service_model.operation_model("UpdateEndpoint")
        report = ParamValidator().validate(request, model.input_shape)
        assert not report.has_errors(), report.generate_report()
        name = request["EndpointName"]
        tags = self.sagemaker.list_tags(ResourceArn=self.sagemaker.describe_endpoint(EndpointName=name)["EndpointArn"])
        self.sagemaker.delete_endpoint(EndpointName=name)
        self.sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=request["EndpointConfigName"],
                                       Tags=tags.get("Tags", []))
        self.updates.append(request)
        return {"EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{name}"}


    def stop(self) -> None:
        self.http.stop()
        for process, _ in self.containers.values():
            signal_group(process, signal.SIGCONT)  # a frozen container cannot act on SIGTERM
            stop_group(process)
        self.containers.clear()
