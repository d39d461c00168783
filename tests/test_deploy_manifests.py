"""The Helm values and Kubernetes manifests (deploy/helm) and the Terraform of each cloud (deploy/<cloud>/terraform),
checked statically: no cluster, no cloud, no provider download.

- Kubernetes: every object validated against the Kubernetes API's own OpenAPI schemas (kubernetes-validate,
  strict: an unknown field fails), and the values wired to them (services, secrets, the GPU pod template).
- Terraform: `terraform fmt -check`, a policy scan by checkov with no failed check (each skip carries its
  reason in the file), and the roles and policies read from the same files the least-privilege tests read.
- Identities (``iam_scope``): no binding project- or resource-group-wide but the documented exceptions, each
  identity granted exactly the permissions its calls need (deploy/<cloud>/permissions.*), and only Airflow
  writing raw/ and the frozen holdout, once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import mlflow_search_status

from mlfactory.config import TRAINING_POD_TEMPLATE_ENV, TRAINING_QUEUE_ENV
from mlfactory.backends.local.local_airflow import PROJECT

HELM = PROJECT / "deploy" / "helm"
CLOUDS = ("aws", "gcp", "azure")
KUBERNETES_VERSION = "1.31"
CHECKOV = PROJECT / ".tools" / "checkov" / "bin" / "checkov"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((HELM / name).read_text()) if d]


def values() -> dict:
    return yaml.safe_load((HELM / "values.yaml").read_text())


def env_of(container_env: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container_env}


@pytest.mark.parametrize("name", ["mlflow.yaml", "model-server.yaml", "gpu-training-pod.yaml"])
def test_every_kubernetes_object_is_valid_against_the_api_schema(name):
    import kubernetes_validate

    for document in documents(name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_an_invalid_object_is_refused_by_that_validation():
    import kubernetes_validate

    pod = documents("gpu-training-pod.yaml")[0]
    pod["spec"]["containers"][0]["resourcez"] = pod["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_values_run_the_kubernetes_executor_with_git_sync_secrets_and_the_services():
    v = values()
    assert v["executor"] == "KubernetesExecutor"
    assert v["dags"]["gitSync"]["enabled"] and v["dags"]["gitSync"]["subPath"] == "dags"
    assert v["images"]["airflow"]["repository"] == "mlfactory-airflow"
    assert v["postgresql"]["enabled"] is False and v["data"]["metadataSecretName"]
    for key in ("fernetKeySecretName", "jwtSecretName", "apiSecretKeySecretName"):
        assert v[key], key  # chart-generated secrets would change on every render
    assert v["config"]["core"]["auth_manager"].endswith("SimpleAuthManager")
    env = env_of(v["env"])
    # the services the DAGs call are the manifests' Services, on their ports
    services = {d["metadata"]["name"]: d for f in ("mlflow.yaml", "model-server.yaml") for d in documents(f)
                if d["kind"] == "Service"}
    for variable, service in (("MLFLOW_TRACKING_URI", "mlflow"), ("MLFACTORY_ENDPOINT_URL", "model-server"),
                              ("MLFACTORY_ENDPOINT_ADMIN_URL", "model-server-admin")):
        host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env[variable]).groups()
        assert host == service and int(port) in [p["port"] for p in services[service]["spec"]["ports"]]
    # connections and the endpoint token come from Secrets, never from values
    secrets = {s["envName"]: s for s in v["secret"]}
    assert any(name.startswith("AIRFLOW_CONN_") for name in secrets)
    # Airflow holds the model server's admin credential, never a client's
    assert "MLFACTORY_SERVING_ADMIN_TOKEN" in secrets and "MLFACTORY_SERVING_ADMIN_TOKEN" not in env
    assert "MLFACTORY_SERVING_TOKEN" not in secrets
    assert not any(re.search(r"(?i)password|token|secret", str(e.get("value", ""))) for e in v["env"])


def test_training_tasks_get_the_gpu_pod_template_which_the_image_carries():
    env = env_of(values()["env"])
    path = env[TRAINING_POD_TEMPLATE_ENV]
    dockerfile = (PROJECT / "Dockerfile").read_text()
    assert f"deploy/helm/gpu-training-pod.yaml {path}" in dockerfile
    assert TRAINING_QUEUE_ENV not in env  # the KubernetesExecutor has no queues: the pod template places the task
    pod = documents("gpu-training-pod.yaml")[0]
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "base"  # the container Airflow fills in
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    assert pod["spec"]["nodeSelector"]
    # ml_train hands the template to the executor
    from mlfactory.config import TrainingSpec

    assert TrainingSpec(pod_template_file=path).executor_config() == {"pod_template_file": path}
    assert TrainingSpec(pod_template_file="").executor_config() == {}


def test_terraform_is_formatted():
    terraform = shutil.which("terraform")
    assert terraform, "terraform is not on PATH (docs/getting-started.md)"
    proc = subprocess.run([terraform, "fmt", "-check", "-recursive", "-diff", str(PROJECT / "deploy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_finds_nothing_in_the_terraform_and_the_dockerfiles():
    assert CHECKOV.exists(), "checkov is missing: `make test` installs it into .tools/checkov"
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(PROJECT), "--framework", "terraform", "dockerfile", "--skip-path", ".venv",
         "--skip-path", ".tools", "--skip-path", ".azurite", "--skip-path", "tests", "--skip-download", "--compact",
         "-o", "json"],
        capture_output=True, text=True, timeout=600,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {r["check_type"]: r["summary"] for r in reports}
    assert set(summary) == {"terraform", "dockerfile"}, summary
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert summary["terraform"]["resource_count"] >= 40 and summary["terraform"]["parsing_errors"] == 0
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped and all(c["check_result"].get("suppress_comment") for c in skipped)  # every skip says why


@pytest.mark.parametrize("cloud", CLOUDS)
def test_terraform_reads_the_roles_the_least_privilege_tests_read(cloud):
    main = (PROJECT / "deploy" / cloud / "terraform" / "main.tf").read_text()
    role_files = sorted(p.name for p in (PROJECT / "deploy" / cloud).glob("*-role.*" if cloud != "aws" else "*-policy.json"))
    assert len(role_files) >= {"aws": 5, "gcp": 6, "azure": 3}[cloud], role_files
    for name in role_files:
        stem = name.rsplit(".", 1)[0]
        assert f'"{stem}"' in main or f'"{stem.removesuffix("-role")}"' in main, f"{cloud} terraform does not read {name}"
    assert not re.search(r'"(s3|sagemaker|aiplatform|storage|Microsoft\.MachineLearningServices)[:.][A-Za-z/*]+"\s*[,\]]', main), \
        "a permission is written in the terraform instead of read from the role files"
    if cloud == "aws":  # every placeholder of the policy files is filled in
        placeholders = set()
        for name in role_files:
            placeholders |= set(re.findall(r"\b(MLFACTORY_[A-Z_]+|REGION|ACCOUNT_ID)\b", (PROJECT / "deploy" / "aws" / name).read_text()))
        missing = [p for p in placeholders if f'"{p}"' not in main]
        assert not missing, missing
    else:  # the conditions on object names come from the prefixes every cloud shares
        assert 'file("${path.module}/../../bucket-prefixes.yaml")' in main


@pytest.mark.parametrize("cloud, dead_letter", [("aws", "redrive_policy"), ("gcp", "dead_letter_policy"),
                                                 ("azure", "storage_blob_dead_letter_destination")])
def test_landing_notifications_have_a_dead_letter_and_a_budget(cloud, dead_letter):
    main = (PROJECT / "deploy" / cloud / "terraform" / "main.tf").read_text()
    notification = {"aws": "aws_s3_bucket_notification", "gcp": "google_storage_notification",
                    "azure": "azurerm_eventgrid_system_topic_event_subscription"}[cloud]
    budget = {"aws": "aws_budgets_budget", "gcp": "google_billing_budget",
              "azure": "azurerm_consumption_budget_resource_group"}[cloud]
    for resource in (notification, budget):
        assert f'resource "{resource}"' in main
    assert dead_letter in main and "landing/" in main


@pytest.mark.parametrize("cloud", CLOUDS)
def test_no_identity_is_granted_anything_project_or_resource_group_wide(cloud):
    """Every binding is on what its role acts on: the bucket (with conditions on object names), the subscription or
    queues, the jobs' service accounts, the workspace. The exceptions and their reasons are iam_scope's: on GCP a
    project role of aiplatform.* alone (Vertex AI takes IAM policies on none of the pipeline's resources), on Azure a
    resource-group role of Microsoft.Insights actions alone (autoscale settings and alert rules live there), on AWS
    "Resource": "*" only for actions that have no resource-level permissions."""
    from iam_scope import Deployment

    deployment = Deployment(cloud)
    assert deployment.bindings and deployment.scope_violations() == []
    assert {i for b in deployment.bindings for i in b.identities} >= {"airflow", "training", "serving"}


def terraform_with(cloud: str, old: str, new: str):
    """The deployment of ``cloud`` with ``old`` replaced by ``new`` in a copy of its main.tf."""
    from iam_scope import Deployment

    text = (PROJECT / "deploy" / cloud / "terraform" / "main.tf").read_text()
    assert old in text
    return Deployment(cloud, text.replace(old, new))


def role_with(cloud: str, role: str, field: str, added):
    """The deployment of ``cloud`` with ``added`` appended to a copy of one of its roles' ``field``."""
    from iam_scope import Deployment

    doc = Deployment(cloud).roles[role]
    return Deployment(cloud, roles={role: {**doc, field: [*doc[field], added]}})


def test_the_scope_check_refuses_a_project_wide_binding_an_act_as_anywhere_and_a_wildcard():
    """The check above fails on what it is there to refuse (each change made to a copy of the deployment)."""
    project_wide = terraform_with("gcp", 'resource "google_storage_bucket_iam_member" "airflow" {\n  bucket = google_storage_bucket.mlfactory.name',
                                  'resource "google_project_iam_member" "airflow_bucket" {\n  project = var.project')
    assert project_wide.scope_violations() == [
        "google_project_iam_member.airflow_bucket: airflow-bucket is bound on the project: only a role of aiplatform.* "
        "permissions alone may be"]
    acting = role_with("gcp", "airflow", "includedPermissions", "iam.serviceAccounts.actAs")
    assert [v.split(":")[0] for v in acting.scope_violations()] == [
        "google_project_iam_member.airflow", "google_project_iam_member.airflow"]  # not aiplatform alone; actAs there
    predefined = terraform_with("gcp", 'google_project_iam_custom_role.mlfactory["landing"].id', '"roles/pubsub.subscriber"')
    assert "predefined role roles/pubsub.subscriber for ['airflow']" in " ".join(predefined.scope_violations())
    group_wide = terraform_with("azure", "    workspace = local.workspace\n", "    workspace = data.azurerm_resource_group.ml.id\n")
    assert group_wide.scope_violations() == [
        "azurerm_role_assignment.airflow: airflow is assigned on data.azurerm_resource_group.ml.id: only a role of "
        "Microsoft.Insights actions alone may be"]
    keys = role_with("azure", "airflow", "Actions", "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/listKeys/action")
    assert "azurerm_role_assignment.airflow: airflow can list keys" in keys.scope_violations()
    wildcard = role_with("aws", "airflow-policy", "Statement",
                         {"Sid": "Everything", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"})
    assert wildcard.scope_violations() == [
        "airflow-policy.json Everything: Resource * for ['s3:GetObject'], which take resource-level permissions"]


@pytest.mark.parametrize("cloud, identity", [(c, i) for c in CLOUDS for i in ("airflow", "training", "serving")
                                             if (c, i) not in (("aws", "training"), ("aws", "serving"))])
def test_each_identity_is_granted_what_its_calls_need_and_nothing_else(cloud, identity):
    """What the Terraform's bindings give an identity, in all, is what deploy/<cloud>/permissions.* lists for its
    calls (test_<cloud>_requests checks the backend makes every call listed there): a grant no call needs fails. (The
    AWS job roles' own policies are checked by what they let each role read and write: test_aws_requests and below.)"""
    from iam_scope import Deployment, documented

    assert Deployment(cloud).granted(identity) == documented(cloud, identity)


def test_a_grant_no_call_needs_is_caught():
    from iam_scope import documented

    deleting = role_with("gcp", "airflow-bucket", "includedPermissions", "storage.buckets.delete")
    assert deleting.granted("airflow") - documented("gcp", "airflow") == {"storage.buckets.delete"}
    blobs = role_with("azure", "jobs", "DataActions", "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete")
    assert blobs.granted("serving") - documented("azure", "serving") == {
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete"}
    stopping = role_with("aws", "airflow-policy", "Statement", {
        "Effect": "Allow", "Action": "sagemaker:StopTransformJob", "Resource": "arn:aws:sagemaker:*:*:transform-job/*"})
    assert stopping.granted("airflow") - documented("aws", "airflow") == {"sagemaker:StopTransformJob"}


def test_only_ingestion_and_ml_train_write_raw_and_the_holdout_and_only_once():
    """No job identity writes raw/, the frozen holdout or the registry's mlflow/ (deploy/bucket-prefixes.yaml, which GCP's
    and Azure's conditions are made of, and which AWS's role policies name), and Airflow's grants that could replace or
    delete an object carry the condition that spares the raw snapshots and the holdout (AWS: the Deny statements)."""
    from iam_scope import PREFIXES, Deployment

    forbidden = ("raw/", "models/holdout/", "mlflow/")
    for job in ("training", "serving"):
        assert not [p for p in PREFIXES[job]["write"] for f in forbidden if p.startswith(f) or f.startswith(p)], job
        assert "models/holdout/" not in PREFIXES[job]["read"]
    assert PREFIXES["airflow"]["write_once"] == ["raw/", "models/holdout/"]
    replacing = {"gcp": ("google_storage_bucket.mlfactory.name", {"storage.objects.delete", "storage.objects.move"}),
                 "azure": ("azurerm_storage_container.bucket.id", {
                     "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write",
                     "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete"})}
    for cloud, (bucket, writes) in replacing.items():
        deployment = Deployment(cloud)
        on_the_bucket = [b for b in deployment.bindings if bucket in b.scopes and deployment.permissions(b.role) & writes
                         and set(b.identities) & {"airflow", "training", "serving"}]
        assert len(on_the_bucket) == 2, on_the_bucket
        for b in on_the_bucket:
            wanted = "local.under[each.key].write" if b.identities == ("training", "serving") else "local.under.airflow.write_once"
            assert wanted in b.condition, (cloud, b)
    # AWS: each role's policy reads and writes exactly the prefixes of its job; Airflow's refuses any write to the raw
    # snapshots and the holdout but a create-only one, and any delete
    from aws_iam import policy

    for job in ("training", "serving"):
        statements = policy(f"{job}-role-policy.json", MLFACTORY_BUCKET="b")["Statement"]
        for action, access in (("s3:GetObject", "read"), ("s3:PutObject", "write")):
            resources = {r for s in statements if s["Action"] == action for r in ([s["Resource"]] if isinstance(
                s["Resource"], str) else s["Resource"])}
            assert resources == {f"arn:aws:s3:::b/{p}*" for p in PREFIXES[job][access]}, (job, action)
    denies = [s for s in policy("airflow-policy.json", MLFACTORY_BUCKET="b", MLFACTORY_LANDING_QUEUE="q", MLFACTORY_MODEL="m",
                                MLFACTORY_ENDPOINT="e", MLFACTORY_TRAINING_ROLE="t", MLFACTORY_SERVING_ROLE="s")["Statement"]
              if s["Effect"] == "Deny"]
    assert {s["Action"] for s in denies} == {"s3:PutObject", "s3:DeleteObject"}
    for s in denies:
        assert all(r.startswith(tuple(f"arn:aws:s3:::b/{p}" for p in PREFIXES["airflow"]["write_once"])) for r in s["Resource"])


def test_no_process_mlfactory_starts_reports_mlflow_usage(tmp_path):
    """MLflow 3 reports usage to mlflow-telemetry.io unless MLFLOW_DISABLE_TELEMETRY is true (it ignores
    MLFLOW_ENABLE_TELEMETRY=false and DO_NOT_TRACK=1): set in `make run`'s Airflow (its tasks, training jobs and
    model server inherit it), its MLflow server, both images and the manifests."""
    import sys

    from mlfactory.backends.local.local_airflow import LocalAirflow

    check = "from mlflow.telemetry.utils import is_telemetry_disabled as off; print(off())"
    ci = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS")  # MLflow stays quiet under these anyway: not the test's case
    env = {k: v for k, v in LocalAirflow(tmp_path / "airflow").env().items() if k not in ci}

    def disabled(environment: dict) -> str:
        return subprocess.run([sys.executable, "-c", check], env=environment, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert disabled(env) == "True"
    assert disabled({k: v for k, v in env.items() if k != "MLFLOW_DISABLE_TELEMETRY"}) == "False"  # it is this setting
    server = (PROJECT / "include/mlfactory/backends/local/mlflow_server.py").read_text()
    assert '"MLFLOW_DISABLE_TELEMETRY": "true"' in server
    for dockerfile in ("Dockerfile", "docker/runtime.Dockerfile"):
        assert "MLFLOW_DISABLE_TELEMETRY=true" in (PROJECT / dockerfile).read_text(), dockerfile
    compose = yaml.safe_load((PROJECT / "docker-compose.yaml").read_text())
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    mlflow_pod = next(d for d in yaml.safe_load_all((PROJECT / "deploy/helm/mlflow.yaml").read_text())
                      if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"} in mlflow_pod


def test_mlflow_on_kubernetes_asks_for_a_login_that_airflow_and_the_model_server_carry(tmp_path):
    """deploy/helm/mlflow.yaml's container command, run here as the pod would (its secrets' values made up, SQLite for
    PostgreSQL, loopback and a free port for 0.0.0.0:5000): every request but /health needs a login; Airflow's
    containers and the model server get the admin's password from the same secret key."""
    import os
    import sys
    from mlfactory.backends.local.processes import free_port, start, stop_group

    (deployment, _) = documents("mlflow.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
               if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] == "admin-password"
    server_env = next(c for c in documents("model-server.yaml")[0]["spec"]["template"]["spec"]["containers"])["env"]
    assert {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key", e.get("value")) for e in server_env
            if e["name"].startswith("MLFLOW_TRACKING_")} == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                                             "MLFLOW_TRACKING_USERNAME": "admin",
                                                             "MLFLOW_TRACKING_PASSWORD": "admin-password"}
    assert {"envName": "MLFLOW_TRACKING_PASSWORD", "secretName": "mlfactory-mlflow", "secretKey": "admin-password"} in values()["secret"]
    port = free_port()
    script = container["args"][0].replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    script = script.replace('--allowed-hosts "mlflow,', f'--allowed-hosts "127.0.0.1:{port},mlflow,')
    password = "test-admin-password"
    made_up = {"auth-database-uri": f"sqlite:///{tmp_path}/auth.db", "admin-password": password,
               "flask-secret-key": "test-flask-key", "backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db"}
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e},
           **{name: made_up[key] for name, key in secrets.items()}, "POD_NAMESPACE": "airflow",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"), "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    script = script.replace("/tmp/basic_auth.ini", env["MLFLOW_AUTH_CONFIG_PATH"])
    url = f"http://127.0.0.1:{port}"
    server = start(["sh", "-c", script], tmp_path / "mlflow.log", f"{url}/health", "mlflow", env=env, cwd=tmp_path)
    try:
        assert [mlflow_search_status(url, login) for login in (None, f"admin:{password}")] == [401, 200]
    finally:
        stop_group(server)
