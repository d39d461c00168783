"""A small local stand-in for Azure Resource Manager's Azure ML (and Azure Monitor autoscale) API, spoken
to over HTTPS by azure-ai-ml's real ``MLClient`` (``AZUREML_DEV_URL_MFE`` points it here) and
azure-mgmt-monitor's client. There is no Azure ML emulator.

Every request body is checked against the SDK's own REST models (``azure.ai.ml._restclient.arm_ml_service``
and ``azure.mgmt.monitor``): a field the model does not have is answered 400, naming it. Answers are the
stored bodies with what the service adds (id, name, provisioning state, status, scoring URIs), so the SDK
parses them as it parses Azure's. Long operations answer 201/202 with ``Azure-AsyncOperation`` /
``Location`` headers on an operation the fake completes in a thread.

What runs "in the cloud" is the test's: ``run_job(job: dict)`` plays a command job's containers (raise to
fail it), ``serve(deployment: dict) -> url`` starts an online deployment's container and returns its base
URL (the fake routes ``POST /score/<endpoint>`` to it by the traffic split, or by the
``azureml-model-deployment`` header, with a Microsoft Entra token: the endpoints take no key), and
``run_batch(deployment, inputs)`` plays a batch deployment over an invocation's inputs. ``fail_next_job(message)`` makes the next job fail.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from loopback_http import LoopbackServer

WS = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
AUTOSCALE = r"/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.insights/autoscalesettings/[^/]+"
ALERT_STATUS = r"/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.insights/metricalerts/(?P<rule>[^/]+)/status"


class BadRequest(Exception):
    pass


def _rest_errors(cls, body, where: str) -> list[str]:
    """Fields of ``body`` that the REST model ``cls`` (and its nested models) does not have."""
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import Model

    obj = cls(body)
    fields = {f._rest_name: attr for attr, f in type(obj)._attr_to_rest_field.items()}
    errors = [f"{where}.{k}: {type(obj).__name__} has no field {k!r}" for k in body if k not in fields]
    for key, raw in body.items():
        if key not in fields or not isinstance(raw, dict):
            continue
        value = getattr(obj, fields[key])
        if isinstance(value, Model):
            errors += _rest_errors(type(value), raw, f"{where}.{key}")
        elif isinstance(value, dict):
            errors += [e for k, v in value.items() if isinstance(v, Model) and isinstance(raw.get(k), dict)
                       for e in _rest_errors(type(v), raw[k], f"{where}.{key}.{k}")]
    return errors


def check_body(model_name: str, body: dict) -> None:
    from azure.ai.ml._restclient.arm_ml_service import models

    errors = _rest_errors(getattr(models, model_name), body, model_name)
    if errors:
        raise BadRequest("; ".join(errors))


def check_autoscale(body: dict) -> None:
    from azure.mgmt.monitor.models import AutoscaleSettingResource

    setting = AutoscaleSettingResource.deserialize(body)
    try:
        again = setting.serialize(keep_readonly=True)
    except Exception as err:  # noqa: BLE001 - msrest's validation error, as the service's 400
        raise BadRequest(f"AutoscaleSettingResource: {err}") from None
    unknown = sorted(set(body) - set(again) - {"id", "name", "type"})
    unknown += sorted(f"properties.{k}" for k in set(body.get("properties", {})) - set(again.get("properties", {})))
    if unknown:
        raise BadRequest(f"AutoscaleSettingResource has no field(s) {unknown}")


def tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1, its key, and a CA bundle (certifi's + it) for REQUESTS_CA_BUNDLE."""
    import datetime
    import ipaddress

    import certifi
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file, bundle = folder / "cert.pem", folder / "key.pem", folder / "ca-bundle.pem"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + pem)
    return cert_file, key_file, bundle


def fake_az_cli(folder: Path) -> Path:
    """An ``az`` on PATH that answers ``az account get-access-token`` as the Azure CLI does (for
    AzureCliCredential, picked by AZURE_TOKEN_CREDENTIALS=AzureCliCredential); its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "az"
    script.write_text(f"#!{sys.executable}\nimport json, sys, time\n"
                      "assert sys.argv[1:4] == ['account', 'get-access-token', '--output'], sys.argv\n"
                      "print(json.dumps({'accessToken': 'fake-arm-token', 'expires_on': int(time.time()) + 3600, "
                      "'subscription': '00000000-0000-0000-0000-000000000000', 'tenant': 'mlfactory-test', "
                      "'tokenType': 'Bearer'}))\n")
    script.chmod(0o755)
    return folder


class AzureMLFake(LoopbackServer):
    def __init__(self, tls: tuple[Path, Path], run_job=None, serve=None, run_batch=None, provision_s: float = 0.5):
        self.run_job, self.serve, self.run_batch, self.provision_s = run_job, serve, run_batch, provision_s
        self.lock = threading.RLock()
        self.resources: dict[str, dict] = {}  # ARM id (lowercase) -> body
        self.operations: dict[str, dict] = {}
        self.containers: dict[str, str] = {}  # deployment id -> container URL
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call
        self.refused: list[str] = []  # the 400s
        self.answered: dict[str, int] = {}  # deployment name -> scoring requests answered
        self.alerts: dict[str, str] = {}  # metric alert rule -> its status ("Healthy"; anything else: it fires)
        self._failures: list[str] = []
        self._ids = itertools.count(1)
        super().__init__(self._handler(), tls)

    # -- test controls ----------------------------------------------------------------------
    def fail_next_job(self, message: str) -> None:
        self._failures.append(message)

    def calls(self, pattern: str) -> list[str]:
        return [f"{m} {p}" for m, p in self.requests if re.search(pattern, f"{m} {p}", re.I)]

    def find(self, pattern: str) -> dict[str, dict]:
        with self.lock:
            return {k: v for k, v in self.resources.items() if re.search(pattern, k, re.I)}

    # -- state ------------------------------------------------------------------------------
    def _set(self, rid: str, body: dict) -> dict:
        with self.lock:
            self.resources[rid.lower()] = body
        return body

    def _get(self, rid: str) -> dict | None:
        with self.lock:
            return self.resources.get(rid.lower())

    def _operation(self, work, rid: str, kind: str = "mfeOperationsStatus") -> str:
        """A new async operation running ``work()`` in a thread; its URL (``kind`` mfeOperationsStatus for an
        Azure-AsyncOperation header, mfeOperationResults for a Location header), as Azure ML names them."""
        op = str(next(self._ids))
        self.operations[op] = {"status": "InProgress"}

        def run():
            try:
                time.sleep(self.provision_s)
                work()
                self.operations[op] = {"status": "Succeeded"}
            except Exception as err:  # noqa: BLE001 - the operation's error, as ARM reports it
                self.operations[op] = {"status": "Failed", "error": {"code": "Failed", "message": str(err)}}
                print(f"azureml fake: operation {op} failed: {err!r}", file=sys.stderr)

        threading.Thread(target=run, daemon=True).start()
        subscription = rid.split("/")[2]
        return (f"{self.url}/subscriptions/{subscription}/providers/Microsoft.MachineLearningServices/locations/"
                f"eastus/{kind}/{op}")

    def _provision(self, rid: str, body: dict, work=None) -> tuple[int, dict, dict]:
        props = body.setdefault("properties", {})
        props["provisioningState"] = "Creating" if not self._get(rid) else "Updating"
        self._set(rid, body)

        def done():
            try:
                if work:
                    work(body)
                props["provisioningState"] = "Succeeded"
            except Exception:
                props["provisioningState"] = "Failed"
                raise

        return 201, body, {"Azure-AsyncOperation": self._operation(done, rid)}

    # -- jobs -------------------------------------------------------------------------------
    def _start_job(self, rid: str, body: dict, play) -> None:
        props = body["properties"]
        props["status"] = "Queued"

        def run():
            time.sleep(0.2)
            if props["status"] == "Canceled":
                return
            props["status"] = "Running"
            failure = self._failures.pop(0) if self._failures else None
            try:
                if failure:
                    raise RuntimeError(failure)
                if play:
                    play()
                if props["status"] != "Canceled":
                    props["status"] = "Completed"
            except Exception as err:  # noqa: BLE001 - the job's failure, as Azure ML reports it
                props["status"] = "Failed"
                props.setdefault("properties", {})["azureml.error"] = str(err)[-2000:]

        threading.Thread(target=run, daemon=True).start()

    # -- HTTP -------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body=None, headers: dict | None = None, raw: bytes | None = None):
                data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _any(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parsed = urlparse(self.path)
                path = parsed.path.rstrip("/")
                with fake.lock:
                    fake.requests.append((method, path))
                try:
                    status, body, headers = fake.route(method, path, parse_qs(parsed.query), raw, self.headers)
                except BadRequest as err:
                    fake.refused.append(str(err))
                    status, body, headers = 400, {"error": {"code": "UserError", "message": str(err)}}, {}
                if isinstance(body, bytes):
                    return self._send(status, headers=headers, raw=body)
                self._send(status, body, headers)

            def do_GET(self):
                self._any("GET")

            def do_PUT(self):
                self._any("PUT")

            def do_POST(self):
                self._any("POST")

            def do_DELETE(self):
                self._any("DELETE")

            def do_PATCH(self):
                self._any("PATCH")

        return Handler

    def route(self, method: str, path: str, query: dict, raw: bytes, headers) -> tuple[int, object, dict]:
        if not path.startswith(("/score/", "/batch/")) and headers.get("Authorization") != "Bearer fake-arm-token":
            return 401, {"error": {"code": "AuthenticationFailed", "message": "no or wrong bearer token"}}, {}
        body = json.loads(raw) if raw else {}
        if m := re.fullmatch(r"/subscriptions/[^/]+/providers/Microsoft\.MachineLearningServices/locations/[^/]+/"
                             r"(?P<kind>mfeOperationsStatus|mfeOperationResults)/(?P<op>\d+)", path):
            status = self.operations[m["op"]]
            if m["kind"] == "mfeOperationsStatus":
                return 200, status, {}
            return (202, None, {"Location": self.url + path}) if status["status"] == "InProgress" else (204, None, {})
        if path.startswith("/score/"):
            return self._score(path.split("/")[2], raw, headers)
        if m := re.fullmatch(r"/batch/(?P<endpoint>[^/]+)/jobs", path):
            return self._invoke(m["endpoint"], body)
        if (m := re.fullmatch(ALERT_STATUS, path, re.I)) and method == "GET":  # a metric alert rule's status
            if m["rule"] not in self.alerts:
                return _not_found(path)
            rule = path.rsplit("/", 1)[0]
            return 200, {"value": [{"id": rule, "name": "cmVzb3VyY2VJZD0", "type": "Microsoft.Insights/metricAlerts/status",
                                    "properties": {"dimensions": {}, "status": self.alerts[m["rule"]],
                                                   "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}]}, {}
        if re.fullmatch(AUTOSCALE, path, re.I):
            if method == "PUT":
                check_autoscale(body)
                body.update(id=path, name=path.rsplit("/", 1)[1], type="Microsoft.Insights/autoscaleSettings")
                return 200, self._set(path, body), {}
            found = self._get(path)
            return (200, found, {}) if found else _not_found(path)
        m = re.fullmatch(WS + r"(?P<rest>/.*)?", path)
        if not m:
            return _not_found(path)
        ws_id, rest = path[: len(path) - len(m["rest"] or "")], m["rest"] or ""
        if not rest:
            return 200, {"id": ws_id, "name": m["ws"], "type": "Microsoft.MachineLearningServices/workspaces",
                         "location": "eastus", "properties": {"discoveryUrl": f"{self.url}/discovery",
                                                              "workspaceId": "00000000-0000-0000-0000-0000000000ff",
                                                              "mlFlowTrackingUri": "azureml://eastus.api.azureml.ms/mlflow"}}, {}
        return self._workspace(method, path, rest, body)

    def _workspace(self, method: str, path: str, rest: str, body: dict) -> tuple[int, object, dict]:
        kinds = {r"/jobs/[^/]+": "JobBase", r"/environments/[^/]+/versions/[^/]+": "EnvironmentVersion",
                 r"/models/[^/]+/versions/[^/]+": "ModelVersion", r"/codes/[^/]+/versions/[^/]+": "CodeVersion",
                 r"/datastores/[^/]+": "Datastore", r"/onlineEndpoints/[^/]+": "OnlineEndpoint",
                 r"/onlineEndpoints/[^/]+/deployments/[^/]+": "OnlineDeployment",
                 r"/batchEndpoints/[^/]+": "BatchEndpoint", r"/batchEndpoints/[^/]+/deployments/[^/]+": "BatchDeployment"}
        kind = next((k for pattern, k in kinds.items() if re.fullmatch(pattern, rest)), None)
        if method == "POST" and rest.endswith("/cancel"):
            job = self._get(path.rsplit("/", 1)[0])
            if job is None:
                return _not_found(path)
            if job["properties"].get("status") not in ("Completed", "Failed", "Canceled"):
                job["properties"]["status"] = "Canceled"
            return 202, None, {"Location": self._operation(lambda: None, path, "mfeOperationResults")}
        if method == "GET" and kind is None:  # a collection
            prefix = path.lower() + "/"
            with self.lock:
                items = [v for k, v in self.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix):]]
            return 200, {"value": items}, {}
        if method == "GET":
            found = self._get(path)
            return (200, found, {}) if found else _not_found(path)
        if method == "DELETE":
            return self._delete(path)
        if method != "PUT" or kind is None:
            return _not_found(path)
        check_body(kind, body)
        name = path.rsplit("/", 1)[1]
        body.update(id=path, name=name if "/versions/" not in path else name)
        body.setdefault("properties", {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        created = (self._get(path) or {}).get("systemData", {}).get("createdAt", now)
        body["systemData"] = {"createdAt": created, "createdBy": "mlfactory-test", "createdByType": "Application",
                              "lastModifiedAt": now, "lastModifiedBy": "mlfactory-test", "lastModifiedByType": "Application"}
        if kind == "JobBase":
            previous = self._get(path)
            if previous:
                return 200, previous, {}
            self._set(path, body)
            self._start_job(path, body, (lambda: self.run_job(body)) if self.run_job else None)
            return 201, body, {}
        if kind == "ModelVersion":
            body["properties"].setdefault("flavors", {})
        if kind == "OnlineEndpoint":
            endpoint = path.rsplit("/", 1)[1]
            body["properties"]["scoringUri"] = f"{self.url}/score/{endpoint}"
            body["properties"].setdefault("traffic", {})
            deployments = {d["name"] for d in self.find(re.escape(path.lower()) + "/deployments/[^/]+$").values()}
            unknown = sorted(set(body["properties"]["traffic"]) - deployments)
            if unknown or (body["properties"]["traffic"] and sum(body["properties"]["traffic"].values()) not in (0, 100)):
                raise BadRequest(f"traffic {body['properties']['traffic']}: deployments {unknown} do not exist, or the "
                                 "values do not sum to 100")
            return self._provision(path, body)
        if kind == "OnlineDeployment":  # what the service fills in
            body["properties"].setdefault("scaleSettings", {"scaleType": "Default"})
            return self._provision(path, body, self._start_container if self.serve else None)
        if kind == "BatchEndpoint":
            body["properties"]["scoringUri"] = f"{self.url}/batch/{path.rsplit('/', 1)[1]}/jobs"
            return self._provision(path, body)
        if kind == "BatchDeployment":
            return self._provision(path, body)
        return 201, self._set(path, body), {}

    def _start_container(self, body: dict) -> None:
        self.containers[body["id"].lower()] = self.serve(body)

    def _delete(self, path: str) -> tuple[int, object, dict]:
        found = self._get(path)
        if found is None:
            return 204, None, {}
        if "/onlineendpoints/" in path.lower() and "/deployments/" in path.lower():
            endpoint = self._get(path.rsplit("/deployments/", 1)[0])
            if endpoint and endpoint["properties"].get("traffic", {}).get(found["name"]):
                raise BadRequest(f"deployment {found['name']} still has traffic: set it to 0 before deleting it")
        found["properties"]["provisioningState"] = "Deleting"

        def gone():
            with self.lock:
                self.resources.pop(path.lower(), None)
                self.containers.pop(path.lower(), None)

        return 202, None, {"Location": self._operation(gone, path, "mfeOperationResults")}

    def _score(self, endpoint_name: str, raw: bytes, headers) -> tuple[int, object, dict]:
        endpoint = next((v for k, v in self.find(r"/onlineendpoints/" + re.escape(endpoint_name.lower()) + "$").items()), None)
        if endpoint is None:
            return _not_found(endpoint_name)
        if endpoint["properties"].get("authMode") != "AADToken" or headers.get("Authorization") != "Bearer fake-arm-token":
            return 401, {"message": "an endpoint with auth mode AADToken and a Microsoft Entra token, or nothing"}, {}
        traffic = {k: v for k, v in endpoint["properties"].get("traffic", {}).items() if v}
        chosen = headers.get("azureml-model-deployment") or (
            random.choices(list(traffic), weights=list(traffic.values()))[0] if traffic else None)
        url = self.containers.get(f"{endpoint['id']}/deployments/{chosen}".lower()) if chosen else None
        if url is None:
            return 424, {"message": f"no deployment {chosen!r} ready on {endpoint_name}"}, {}
        request = urllib.request.Request(f"{url}/score", data=raw, method="POST",
                                         headers={"Content-Type": headers.get("Content-Type", "application/json")})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                answer, status = reply.read(), reply.status
        except urllib.error.HTTPError as err:
            answer, status = err.read(), err.code
        with self.lock:
            self.answered[chosen] = self.answered.get(chosen, 0) + 1
        return status, answer, {"azureml-model-deployment": chosen}  # as Azure ML names the deployment that answered

    def _invoke(self, endpoint_name: str, body: dict) -> tuple[int, object, dict]:
        from azure.ai.ml._restclient.arm_ml_service import models  # noqa: F401 - the body as the SDK sent it

        endpoints = self.find(r"/batchendpoints/" + re.escape(endpoint_name.lower()) + "$")
        if not endpoints:
            return _not_found(endpoint_name)
        (endpoint_id,) = endpoints
        inputs = body.get("properties", {}).get("inputData") or {}
        if not inputs:
            raise BadRequest(f"invocation of {endpoint_name} has no inputData: {body}")
        deployments = self.find(re.escape(endpoint_id) + "/deployments/[^/]+$")
        if not deployments:
            raise BadRequest(f"batch endpoint {endpoint_name} has no deployment")
        deployment = next(iter(deployments.values()))
        workspace = endpoint_id.split("/batchendpoints/")[0]
        name = f"batchjob-{next(self._ids)}"
        rid = f"{workspace}/jobs/{name}"
        job = {"id": rid, "name": name, "properties": {"jobType": "Pipeline", "status": "Queued", "inputs": {},
                                                        "outputs": {}, "jobs": {}, "properties": {},
                                                        "experimentName": endpoint_name}}
        self._set(rid, job)
        play = (lambda: self.run_batch(deployment, inputs)) if self.run_batch else None
        self._start_job(rid, job, play)
        return 200, job, {}


def _not_found(path: str) -> tuple[int, dict, dict]:
    return 404, {"error": {"code": "ResourceNotFound", "message": f"{path} was not found"}}, {}


def env_for(fake_url: str, ca_bundle: Path, az_folder: Path) -> dict[str, str]:
    """The environment a process needs to reach the fake through the SDKs' real credential and transport."""
    return {"REQUESTS_CA_BUNDLE": str(ca_bundle), "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
            "PATH": f"{az_folder}{os.pathsep}{os.environ.get('PATH', '')}", "AZUREML_DEV_URL_MFE": fake_url}
