"""Least privilege, checked from what was actually sent: moto's recorder keeps every request to the
server; each is turned into the IAM action and resource ARN it needs (the operation from the signing
service and X-Amz-Target / Action / the S3 REST call, the resource from the names in it) and evaluated
against a policy file of deploy/aws with its placeholders filled in: an Allow that matches both, and no
Deny that matches. An Allow's conditions are not evaluated (they only narrow what is granted); a Deny's are, on
the condition keys the request carries (an S3 object write's ``s3:if-none-match`` and
``s3:ObjectCreationOperation``), so a create-only write passes the Deny that refuses every other write."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION, ACCOUNT = "us-east-1", "123456789012"  # moto's default account
POLICIES = Path(__file__).resolve().parents[1] / "deploy" / "aws"


@dataclass(frozen=True)
class Call:
    action: str  # service:Operation
    resources: tuple[str, ...]
    what: str  # the request, for messages
    context: tuple[tuple[str, str], ...] = ()  # the condition keys the request carries: (key, value)


SIGNING_TO_IAM = {"monitoring": "cloudwatch"}  # services whose SigV4 signing name is not their IAM prefix


class Recording:
    """moto's recorder, started for one test: ``calls(access_key)`` are the IAM calls signed with that key."""

    def __init__(self, moto_url: str):
        self.url = moto_url
        self._call("reset-recording")
        self._call("start-recording")

    def _call(self, what: str) -> bytes:
        request = urllib.request.Request(f"{self.url}/moto-api/recorder/{what}", method="GET" if what.startswith("download") else "POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def stop(self) -> list[dict]:
        self._call("stop-recording")
        # one JSON object per request, but not one per line: moto writes an entry and its newline in two writes from
        # concurrent request threads, so a large entry can be followed by another on the same line
        text, decoder, entries, at = self._call("download-recording").decode(), json.JSONDecoder(), [], 0
        while (at := re.compile(r"\s*").match(text, at).end()) < len(text):
            entry, at = decoder.raw_decode(text, at)
            entries.append(entry)
        return entries

    @staticmethod
    def calls(entries: list[dict], access_key: str) -> list[Call]:
        out = []
        for entry in entries:
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            signed = re.search(r"Credential=([^/]+)/\d+/([^/]+)/([^/]+)/aws4_request", headers.get("authorization", ""))
            if not signed or signed[1] != access_key:
                continue
            out.extend(to_calls(SIGNING_TO_IAM.get(signed[3], signed[3]), entry, headers))
        return out


def _body(entry: dict) -> bytes:
    body = entry.get("body") or ""
    return base64.b64decode(body) if entry.get("body_encoded") else body.encode()


def to_calls(service: str, entry: dict, headers: dict) -> list[Call]:
    method, url = entry["method"], urllib.parse.urlsplit(entry["url"])
    what = f"{method} {url.path}{'?' + url.query if url.query else ''}"[:200]
    if service == "s3":
        return _s3_calls(method, url, headers, entry, what)
    body = _body(entry)
    target = headers.get("x-amz-target", "")
    if target:
        operation, params = target.rsplit(".", 1)[1], json.loads(body or b"{}")
    else:  # the query protocol
        form = dict(urllib.parse.parse_qsl(body.decode() if body else url.query))
        operation, params = form.get("Action", "?"), form
    return [Call(f"{service}:{operation}", _resources(service, operation, params), what)]


def _resources(service: str, operation: str, params: dict) -> tuple[str, ...]:
    if service == "sagemaker":
        kinds = {"TrainingJobName": "training-job", "TransformJobName": "transform-job", "ModelName": "model",
                 "EndpointConfigName": "endpoint-config", "EndpointName": "endpoint"}
        found = tuple(f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{params[key].lower()}"
                      for key, kind in kinds.items() if isinstance(params.get(key), str))
        if operation in ("CreateEndpointConfig", "CreateTransformJob"):  # IAM checks the config or job, not the model
            found = found[-1:] if operation == "CreateEndpointConfig" else found[:1]
        return found or ((params["ResourceArn"],) if "ResourceArn" in params else ("*",))
    if service == "sqs" and "QueueUrl" in params:
        return (f"arn:aws:sqs:{REGION}:{ACCOUNT}:{params['QueueUrl'].rstrip('/').rsplit('/', 1)[1]}",)
    if service == "cloudwatch":  # DescribeAlarms by name: JSON (AlarmNames) or query (AlarmNames.member.N)
        names = params.get("AlarmNames") or [v for k, v in params.items() if k.startswith("AlarmNames.member.")]
        if isinstance(names, list) and names:
            return tuple(f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{n}" for n in names)
    if service == "logs" and "logGroupName" in params:
        return (f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{params['logGroupName']}",)
    if service == "application-autoscaling" and operation in ("RegisterScalableTarget", "PutScalingPolicy",
                                                              "DeregisterScalableTarget"):
        return (f"arn:aws:application-autoscaling:{REGION}:{ACCOUNT}:scalable-target/{params.get('ResourceId')}",)
    return ("*",)


def _s3_calls(method: str, url, headers: dict, entry: dict, what: str) -> list[Call]:
    bucket, _, key = urllib.parse.unquote(url.path).lstrip("/").partition("/")
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    obj, whole = f"arn:aws:s3:::{bucket}/{key}", f"arn:aws:s3:::{bucket}"
    if not key:
        if method == "POST" and "delete" in query:  # DeleteObjects: one DeleteObject per key
            keys = re.findall(rb"<Key>([^<]+)</Key>", _body(entry))
            return [Call("s3:DeleteObject", (f"{whole}/{k.decode()}",), what) for k in keys]
        action = {"location": "s3:GetBucketLocation", "notification": "s3:GetBucketNotification"}
        found = next((a for q, a in action.items() if q in query), None)
        if method in ("GET", "HEAD"):
            return [Call(found or "s3:ListBucket", (whole,), what)]
        return [Call(f"s3:{method}Bucket?{url.query}", (whole,), what)]
    if method in ("GET", "HEAD"):
        return [Call("s3:ListMultipartUploadParts" if "uploadId" in query else "s3:GetObject", (obj,), what)]
    if method in ("PUT", "POST"):
        # PutObject, CopyObject and CompleteMultipartUpload create the object (and may carry If-None-Match);
        # CreateMultipartUpload and UploadPart(Copy) do not
        creates = "partNumber" not in query and not (method == "POST" and "uploads" in query)
        context = (("s3:ObjectCreationOperation", str(creates).lower()),) + (
            (("s3:if-none-match", headers["if-none-match"]),) if "if-none-match" in headers else ())
        calls = [Call("s3:PutObject", (obj,), what, context)]
        source = headers.get("x-amz-copy-source")
        if source:
            calls.append(Call("s3:GetObject", (f"arn:aws:s3:::{urllib.parse.unquote(source).lstrip('/')}",), what))
        return calls
    if method == "DELETE":
        return [Call("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", (obj,), what)]
    return [Call(f"s3:{method}?", (obj,), what)]


def policy(name: str, **placeholders: str) -> dict:
    text = (POLICIES / name).read_text()
    for placeholder, value in {"REGION": REGION, "ACCOUNT_ID": ACCOUNT, **placeholders}.items():
        text = re.sub(rf"\b{placeholder}\b", value, text)
    left = set(re.findall(r"\b(MLFACTORY_[A-Z_]+)\b", text))
    assert not left, f"placeholders of {name} not given: {left}"
    return json.loads(text)


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _matches(patterns: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value.lower() if p.startswith("arn:aws:sagemaker") else value, p) for p in patterns)


def holds(condition: dict, context: dict[str, str]) -> bool:
    """Whether an IAM Condition block holds for a request carrying the condition keys ``context`` (a key it does
    not carry is absent: Null true holds, any other test fails)."""
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            value, wanted = context.get(key), _listed(wanted)
            if operator == "Null":
                ok = (value is None) == (wanted == ["true"])
            elif operator in ("Bool", "StringEquals"):
                ok = value in wanted
            elif operator == "StringLike":
                ok = value is not None and any(fnmatch.fnmatchcase(value, w) for w in wanted)
            else:
                raise NotImplementedError(f"the checker does not evaluate a Deny's {operator} condition")
            if not ok:
                return False
    return True


def allowed(document: dict, call: Call) -> bool:
    """Whether ``document`` grants ``call`` on every resource it names (explicit Deny wins)."""
    def statements(effect):
        return [s for s in document["Statement"] if s["Effect"] == effect and _matches(_listed(s["Action"]), call.action)]

    for resource in call.resources:
        if any(_matches(_listed(s.get("Resource", "*")), resource) and holds(s.get("Condition", {}), dict(call.context))
               for s in statements("Deny")):
            return False
        if not any(_matches(_listed(s["Resource"]), resource) for s in statements("Allow")):
            return False
    return True


def refused(document: dict, calls: list[Call]) -> list[str]:
    return sorted({f"{c.action} on {', '.join(c.resources)} ({c.what})" for c in calls if not allowed(document, c)})
