"""Azure RBAC as the tests check it: the action each request needs, against what deploy/azure grants.

``action(method, url)`` is how Azure authorizes a request: an ARM call by its resource type and verb
(GET -> read, PUT -> write, DELETE -> delete, POST .../{verb} -> {verb}/action), a data-plane call (an
endpoint's scoring URI, a batch endpoint's jobs, a Storage Queue message) by its data action. What each
identity is granted comes from the Terraform's role assignments (``iam_scope``)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

ML = "Microsoft.MachineLearningServices/workspaces"
QUEUES = "Microsoft.Storage/storageAccounts/queueServices/queues"


def action(method: str, url: str) -> str:
    parsed = urlparse(url)
    path = parsed.path.rstrip("/")
    if path.startswith("/score/"):
        return f"{ML}/onlineEndpoints/score/action"
    if re.fullmatch(r"/batch/[^/]+/jobs", path):
        return f"{ML}/batchEndpoints/deployments/jobs/write"
    if re.search(r"/providers/microsoft\.insights/metricalerts/[^/]+/status$", path, re.I) and method == "GET":
        return "Microsoft.Insights/metricalerts/status/read"
    if re.search(r"/providers/microsoft\.insights/autoscalesettings/", path, re.I):
        return "Microsoft.Insights/autoscalesettings/" + {"GET": "read", "PUT": "write", "DELETE": "delete"}[method]
    if m := re.search(r"/providers/Microsoft\.MachineLearningServices/locations/[^/]+/(?P<kind>mfeOperation\w+)/", path):
        return f"Microsoft.MachineLearningServices/locations/{m['kind']}/read"  # polling a long operation
    m = re.search(r"/providers/Microsoft\.MachineLearningServices/workspaces/[^/]+(?P<rest>/.*)?$", path)
    if m:
        parts = (m["rest"] or "").strip("/").split("/")
        types = parts[0::2] if parts != [""] else []
        if method == "POST":
            return "/".join([ML, *types[:-1], parts[-1], "action"]) if len(parts) % 2 == 0 else \
                "/".join([ML, *types, "action"])
        return "/".join([ML, *types, {"GET": "read", "PUT": "write", "DELETE": "delete"}[method]])
    # Storage Queue data plane: /<account>/<queue>[/messages[/<id>]]
    segments = path.strip("/").split("/")
    query = parse_qs(parsed.query)
    if len(segments) >= 3 and segments[2] == "messages":
        if method == "GET":
            return f"{QUEUES}/messages/" + ("read" if query.get("peekonly") == ["true"] else "process/action")
        return f"{QUEUES}/messages/" + {"POST": "add/action", "DELETE": "delete", "PUT": "write"}[method]
    if len(segments) == 2 and method == "PUT":
        return f"{QUEUES}/write"
    raise AssertionError(f"no RBAC action known for {method} {url}")


def assert_role_covers(requests, identity: str = "airflow") -> set[str]:
    """Every (method, url) of ``requests`` needs an action deploy/azure grants ``identity``; returns the actions used."""
    from iam_scope import Deployment

    used = {action(method, url) for method, url in requests}
    missing = sorted(used - Deployment("azure").granted(identity))
    assert not missing, f"deploy/azure grants {identity} no {missing}"
    return used
