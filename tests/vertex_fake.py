"""A small local stand-in for the Vertex AI API (there is no emulator), spoken to over the aiplatform_v1
clients' real REST transport.

Every request body is parsed into the ``aiplatform_v1`` proto the real service takes (unknown fields and
enum values are errors, answered 400 with the parser's message); every answer is built as a proto and
serialised by protobuf's JSON printer, so nothing here is a hand-written shape the SDK would not accept.
It keeps CustomJobs, BatchPredictionJobs, Models and Endpoints, and answers long-running operations
(``.../operations/N`` with ``done`` and a typed ``response``) for upload, endpoint creation, deploy and undeploy.

What runs "in the cloud" is the test's: ``run_job(job: dict)`` plays a CustomJob's containers (raise to
fail it), ``serve(model: dict) -> url`` starts a deployed model's container and returns its base URL
(the fake proxies ``:predict`` to it along the traffic split), and batch jobs are played here with that
same ``serve``. ``fail_next_job(message)`` makes the next job fail with Vertex's error.
"""

from __future__ import annotations

import json
import random
import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from google.cloud import aiplatform_v1 as v1
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.rpc import status_pb2
from loopback_http import LoopbackServer

PARENT = r"projects/[^/]+/locations/[^/]+"


class BadRequest(Exception):
    pass


class Unavailable(Exception):
    pass


def parse(body: bytes, message_type):
    """``body`` as ``message_type`` (a proto-plus class), refusing unknown fields and enum values."""
    try:
        return message_type.deserialize(json_format.Parse(body or b"{}", message_type.pb()(),
                                                          ignore_unknown_fields=False).SerializeToString())
    except json_format.ParseError as err:
        raise BadRequest(f"{message_type.__name__}: {err}") from None


def to_json(message) -> dict:
    return json.loads(type(message).to_json(message))


def _now():
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class VertexFake(LoopbackServer):
    def __init__(self, run_job=None, serve=None):
        self.run_job, self.serve = run_job, serve
        self.lock = threading.RLock()
        self.custom_jobs: dict[str, v1.CustomJob] = {}
        self.batch_jobs: dict[str, v1.BatchPredictionJob] = {}
        self.models: dict[str, v1.Model] = {}
        self.endpoints: dict[str, v1.Endpoint] = {}
        self.operations: dict[str, operations_pb2.Operation] = {}
        self.containers: dict[str, str] = {}  # deployed model id -> container URL
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call
        self.refused: list[str] = []  # the 400s: bodies the protos refused
        self.predictions: dict[str, int] = {}  # deployed model id -> predict requests answered
        self._failures: list[str] = []
        self._ids = iter(range(1000, 10**9))
        super().__init__(self._handler())

    # -- test controls ----------------------------------------------------------------------
    def fail_next_job(self, message: str) -> None:
        self._failures.append(message)

    def permissions(self) -> dict[str, list[str]]:
        """The IAM permission each request sent so far needs (Vertex AI's REST methods and their permissions,
        as the API reference lists them): permission -> the requests that needed it. Least privilege is
        checked against these, the calls actually made, not against the code's text."""
        kinds = {"customJobs": "customJobs", "batchPredictionJobs": "batchPredictionJobs", "models": "models",
                 "endpoints": "endpoints"}
        verbs = {":cancel": "cancel", ":deployModel": "deploy", ":undeployModel": "undeploy", ":predict": "predict",
                 ":rawPredict": "predict", ":mutateDeployedModel": "update"}
        out: dict[str, list[str]] = {}
        for method, path in self.requests:
            m = re.fullmatch(rf"/(?:v1|ui)/{PARENT}/(\w+)(?:/([^/:]+))?(:\w+)?", path)
            if not m:
                permission = f"unknown: {method} {path}"
            elif m[1] == "operations":
                permission = "aiplatform.operations.list"  # (GetOperation on a location's operations)
            elif m[3] == ":upload" and m[1] == "models":
                permission = "aiplatform.models.upload"
            elif m[3]:
                permission = f"aiplatform.{kinds.get(m[1], m[1])}.{verbs.get(m[3], m[3][1:])}"
            else:
                verb = {"POST": "create", "PATCH": "update", "DELETE": "delete"}.get(method, "get" if m[2] else "list")
                permission = f"aiplatform.{kinds.get(m[1], m[1])}.{verb}"
            out.setdefault(permission, []).append(f"{method} {path}")
        return out

    def ungranted(self) -> dict[str, list[str]]:
        """The requests sent so far whose permission deploy/gcp/airflow-role.yaml does not grant (Airflow's Vertex AI
        role)."""
        import yaml

        role = Path(__file__).resolve().parents[1] / "deploy" / "gcp" / "airflow-role.yaml"
        granted = set(yaml.safe_load(role.read_text())["includedPermissions"])
        return {permission: calls[:3] for permission, calls in self.permissions().items() if permission not in granted}

    def calls(self, pattern: str) -> list[str]:
        return [f"{m} {p}" for m, p in self.requests if re.search(pattern, f"{m} {p}")]

    # -- long-running operations and jobs ---------------------------------------------------
    def _operation(self, location: str, work, response_type) -> dict:
        """A new operation for ``work()`` (run in a thread; returns the response message or raises)."""
        name = f"{location}/operations/{next(self._ids)}"
        operation = operations_pb2.Operation(name=name, done=False)
        with self.lock:
            self.operations[name] = operation

        def run():
            try:
                response = work()
                packed = any_pb2.Any()
                packed.Pack(response_type.pb(response))
                done = operations_pb2.Operation(name=name, done=True, response=packed)
            except Exception as err:  # noqa: BLE001 - the operation's error, as Vertex reports it
                done = operations_pb2.Operation(name=name, done=True, error=status_pb2.Status(code=13, message=str(err)))
            with self.lock:
                self.operations[name] = done

        threading.Thread(target=run, daemon=True).start()
        return json.loads(json_format.MessageToJson(operation))

    def _run_job(self, name: str, play) -> None:
        def run():
            with self.lock:
                job = self._job(name)
                job.state = v1.JobState.JOB_STATE_RUNNING
                job.start_time = _now()
                failure = self._failures.pop(0) if self._failures else None
            try:
                if failure:
                    raise RuntimeError(failure)
                play(name)
                state, error = v1.JobState.JOB_STATE_SUCCEEDED, None
            except Exception as err:  # noqa: BLE001 - the job's failure, as Vertex reports it
                state, error = v1.JobState.JOB_STATE_FAILED, str(err)
            with self.lock:
                job = self._job(name)
                if job.state == v1.JobState.JOB_STATE_CANCELLING:
                    state, error = v1.JobState.JOB_STATE_CANCELLED, "cancelled by the user"
                job.state = state
                job.end_time = _now()
                if error:
                    job.error = status_pb2.Status(code=13, message=error)

        threading.Thread(target=run, daemon=True).start()

    def _job(self, name: str):
        return self.custom_jobs.get(name) or self.batch_jobs[name]

    def _play_custom(self, name: str) -> None:
        if self.run_job is None:
            return
        self.run_job(to_json(self.custom_jobs[name]))

    def _play_batch(self, name: str) -> None:
        """Vertex's part of a batch job: each instance (minus excluded fields) to the model's container; each
        line of output the instance (whole) and its prediction."""
        from mlfactory import storage

        job = self.batch_jobs[name]
        url = self.serve(to_json(self.models[job.model]))
        excluded = set(job.instance_config.excluded_fields)
        lines, failed = [], 0
        for uri in job.input_config.gcs_source.uris:
            instances = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
            for i in range(0, len(instances), 64):
                chunk = instances[i:i + 64]
                reply = _post(url + "/predict", {"instances": [{k: v for k, v in x.items() if k not in excluded}
                                                               for x in chunk]})
                for instance, prediction in zip(chunk, reply["predictions"], strict=True):
                    lines.append(json.dumps({"instance": instance, "prediction": prediction}))
        folder = f"{job.output_config.gcs_destination.output_uri_prefix.rstrip('/')}/prediction-{job.display_name}"
        storage.write_bytes(f"{folder}/prediction.results-00000-of-00001", ("\n".join(lines) + "\n").encode())
        with self.lock:
            job.output_info = v1.BatchPredictionJob.OutputInfo(gcs_output_directory=folder)
            job.completion_stats = v1.CompletionStats(successful_count=len(lines), failed_count=failed)

    def _deploy(self, endpoint_name: str, request: v1.DeployModelRequest):
        deployed = request.deployed_model
        deployed.id = str(next(self._ids))
        model = self.models.get(deployed.model)
        if model is None:
            raise ValueError(f"model {deployed.model} not found")
        if self.serve is not None:
            self.containers[deployed.id] = self.serve(to_json(model))  # Vertex waits for the health route too
        with self.lock:
            endpoint = self.endpoints[endpoint_name]
            endpoint.deployed_models.append(deployed)
            split = dict(request.traffic_split)
            if "0" in split:
                split[deployed.id] = split.pop("0")
            _check_split(split, {d.id for d in endpoint.deployed_models})
            endpoint.traffic_split = split
        return v1.DeployModelResponse(deployed_model=deployed)

    def _undeploy(self, endpoint_name: str, request: v1.UndeployModelRequest):
        with self.lock:
            endpoint = self.endpoints[endpoint_name]
            remaining = [d for d in endpoint.deployed_models if d.id != request.deployed_model_id]
            if len(remaining) == len(endpoint.deployed_models):
                raise ValueError(f"deployed model {request.deployed_model_id} not found")
            split = dict(request.traffic_split) or {k: v for k, v in endpoint.traffic_split.items()
                                                     if k != request.deployed_model_id}
            _check_split(split, {d.id for d in remaining})
            del endpoint.deployed_models[:]
            endpoint.deployed_models.extend(remaining)
            endpoint.traffic_split = split
        self.containers.pop(request.deployed_model_id, None)
        return v1.UndeployModelResponse()

    def _predict(self, endpoint_name: str, request: v1.PredictRequest, instances: list) -> dict:
        with self.lock:
            endpoint = self.endpoints[endpoint_name]
            split = {k: v for k, v in endpoint.traffic_split.items() if v > 0}
        if not split:
            raise BadRequest(f"endpoint {endpoint_name} has no deployed model with traffic")
        chosen = random.choices(list(split), weights=list(split.values()))[0]
        try:
            reply = _post(self.containers[chosen] + "/predict", {"instances": instances})
        except OSError as err:  # the container is down or refused the request
            raise Unavailable(f"deployed model {chosen} failed: {err}") from None
        with self.lock:
            self.predictions[chosen] = self.predictions.get(chosen, 0) + 1
            deployed = next(d for d in endpoint.deployed_models if d.id == chosen)
        response = v1.PredictResponse(deployed_model_id=chosen, model=deployed.model, model_version_id="1")
        response.predictions.extend(reply["predictions"])
        return to_json(response)

    # -- HTTP ---------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict, body: bytes):  # noqa: C901 - one table of routes
        path = unquote(path)
        if m := re.fullmatch(rf"/v1/({PARENT})/customJobs", path):
            if method == "POST":
                job = parse(body, v1.CustomJob)
                if not job.job_spec.worker_pool_specs:
                    raise BadRequest("CustomJob.job_spec.worker_pool_specs is required")
                job.name = f"{m.group(1)}/customJobs/{next(self._ids)}"
                job.state, job.create_time = v1.JobState.JOB_STATE_PENDING, _now()
                with self.lock:
                    self.custom_jobs[job.name] = job
                self._run_job(job.name, self._play_custom)
                return to_json(job)
            return {"customJobs": [to_json(j) for j in self._listed(self.custom_jobs, query)]}
        if m := re.fullmatch(rf"/v1/({PARENT})/batchPredictionJobs", path):
            if method == "POST":
                job = parse(body, v1.BatchPredictionJob)
                if job.model not in self.models:
                    raise BadRequest(f"model {job.model} not found")
                job.name = f"{m.group(1)}/batchPredictionJobs/{next(self._ids)}"
                job.state, job.create_time = v1.JobState.JOB_STATE_PENDING, _now()
                with self.lock:
                    self.batch_jobs[job.name] = job
                self._run_job(job.name, self._play_batch)
                return to_json(job)
            return {"batchPredictionJobs": [to_json(j) for j in self._listed(self.batch_jobs, query)]}
        if m := re.fullmatch(rf"/v1/({PARENT}/(customJobs|batchPredictionJobs)/\d+)(:cancel)?", path):
            with self.lock:
                job = self._job(m.group(1))
                if m.group(3):
                    if job.state in (v1.JobState.JOB_STATE_PENDING, v1.JobState.JOB_STATE_RUNNING):
                        job.state = v1.JobState.JOB_STATE_CANCELLING
                    return {}
                return to_json(job)
        if m := re.fullmatch(rf"/v1/({PARENT})/models:upload", path):
            request = parse(body, v1.UploadModelRequest)
            name = f"{m.group(1)}/models/{request.model_id or next(self._ids)}"

            def upload():
                model = request.model
                model.name, model.version_id = name, "1"
                with self.lock:
                    self.models[name] = model
                return v1.UploadModelResponse(model=name, model_version_id="1")
            return self._operation(m.group(1), upload, v1.UploadModelResponse)
        if m := re.fullmatch(rf"/v1/({PARENT}/models/[^/:]+)", path):
            return self._get(self.models, m.group(1))
        if m := re.fullmatch(rf"/v1/({PARENT})/endpoints", path):
            endpoint = parse(body, v1.Endpoint)
            endpoint_id = query.get("endpointId", [""])[0]
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}|[1-9]\d{0,8}", endpoint_id):
                raise BadRequest(f"CreateEndpointRequest.endpoint_id {endpoint_id!r} is invalid")
            name = f"{m.group(1)}/endpoints/{endpoint_id}"

            def create():
                endpoint.name, endpoint.create_time = name, _now()
                with self.lock:
                    if name in self.endpoints:
                        raise ValueError(f"endpoint {name} already exists")
                    self.endpoints[name] = endpoint
                return endpoint
            return self._operation(m.group(1), create, v1.Endpoint)
        if m := re.fullmatch(rf"/(v1|ui)/({PARENT}/operations/\d+)", path):  # the SDK's operations mixin asks /ui/
            with self.lock:
                if m.group(2) not in self.operations:
                    raise KeyError(path)
                return json.loads(json_format.MessageToJson(self.operations[m.group(2)]))
        if m := re.fullmatch(rf"/v1/(({PARENT})/endpoints/[^/:]+)(:\w+)?", path):
            name, location, verb = m.group(1), m.group(2), m.group(3)
            if name not in self.endpoints:
                raise KeyError(name)
            if verb is None and method == "GET":
                return self._get(self.endpoints, name)
            if verb is None and method == "PATCH":
                update = parse(body, v1.Endpoint)
                if query.get("updateMask") != ["trafficSplit"]:
                    raise BadRequest(f"this fake updates trafficSplit only, got updateMask {query.get('updateMask')}")
                with self.lock:
                    endpoint = self.endpoints[name]
                    _check_split(dict(update.traffic_split), {d.id for d in endpoint.deployed_models})
                    endpoint.traffic_split = dict(update.traffic_split)
                    return to_json(endpoint)
            if verb == ":deployModel":
                request = parse(body, v1.DeployModelRequest)
                return self._operation(location, lambda: self._deploy(name, request), v1.DeployModelResponse)
            if verb == ":undeployModel":
                request = parse(body, v1.UndeployModelRequest)
                return self._operation(location, lambda: self._undeploy(name, request), v1.UndeployModelResponse)
            if verb == ":predict":
                return self._predict(name, parse(body, v1.PredictRequest), json.loads(body)["instances"])
        raise KeyError(f"{method} {path}")

    def _get(self, table: dict, name: str) -> dict:
        with self.lock:
            if name not in table:
                raise KeyError(name)
            return to_json(table[name])

    def _listed(self, jobs: dict, query: dict) -> list:
        wanted = query.get("filter", [""])[0]
        label = re.fullmatch(r'labels\.(\w+)="([^"]*)"', wanted)
        if wanted and not label:
            raise BadRequest(f"this fake filters by one label only, got {wanted!r}")
        with self.lock:
            return [j for j in jobs.values() if not label or j.labels.get(label.group(1)) == label.group(2)]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((method, url.path))
                try:
                    status, answer = 200, fake.route(method, url.path, parse_qs(url.query), body)
                except BadRequest as err:
                    fake.refused.append(str(err))
                    status, answer = 400, {"error": {"code": 400, "message": str(err), "status": "INVALID_ARGUMENT"}}
                except Unavailable as err:
                    status, answer = 503, {"error": {"code": 503, "message": str(err), "status": "UNAVAILABLE"}}
                except KeyError as err:
                    status, answer = 404, {"error": {"code": 404, "message": f"not found: {err}", "status": "NOT_FOUND"}}
                except Exception as err:  # noqa: BLE001 - a bug here: answered, and seen by the test as a 500
                    fake.refused.append(f"internal error: {err!r}")
                    status, answer = 500, {"error": {"code": 500, "message": repr(err), "status": "INTERNAL"}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_PATCH(self):
                self._serve("PATCH")

            def log_message(self, *args):
                pass

        return Handler


def _check_split(split: dict, deployed: set) -> None:
    if split and (sum(split.values()) != 100 or not set(split) <= deployed):
        raise BadRequest(f"traffic split {split} must sum to 100 over deployed models {sorted(deployed)}")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())
