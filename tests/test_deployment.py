"""ml_deploy's blue/green rollout on the local endpoint, against a real model server and MLflow:
first deployment, a canary-checked upgrade, and a deliberately broken model that is rolled back."""

from __future__ import annotations

import pytest
import torch

from conftest import with_section
from mlfactory import storage
from mlfactory.backends.local.endpoint import LocalEndpoint
from mlfactory.backends.local.rollout import LocalEndpointAdapter
from mlfactory.serving.deployment import DeploymentFailed, endpoint_spec, holdout_requests, read_endpoint_state
from mlfactory_airflow.backends import backend_for
from mlfactory.backends.local.processes import free_port
from mlfactory.registry import CHAMPION, Registry
from mlfactory.serving.rollout import Rollout


def broken_model_uri(cfg, holdout, how: str = "nan") -> str:
    """The champion's own bundle, broken: ``nan`` weights (a diverged training run: it loads, and answers NaN),
    or ``raises`` (a preprocessor that no longer fits its network: it loads, and every prediction raises)."""
    from pathlib import Path

    import mlflow
    from mlflow.models import get_model_info

    import mlfactory
    from mlfactory.training.tracking import log_pyfunc

    bundle_path = storage.local_path(storage.join(cfg.storage.models_uri, "runs", "served", "model.pt"))
    bundle = torch.load(bundle_path, weights_only=True)
    if how == "nan":
        bundle["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in bundle["state_dict"].items()}
    else:
        bundle["preprocessor"]["mean"] = bundle["preprocessor"]["mean"][:-1]
    broken = bundle_path.replace("model.pt", f"broken-{how}.pt")
    torch.save(bundle, broken)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run(run_name=f"broken-{how}"):
        if how == "nan":
            return log_pyfunc(broken, cfg.dataset).model_uri
        # (log_pyfunc predicts on an example to write the signature: give it the champion's instead)
        signature = get_model_info(f"models:/{cfg.model_name}/1").signature
        code = Path(mlfactory.__file__).parent / "model_code.py"
        return mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={"bundle": broken},
                                       signature=signature).model_uri


def test_blue_green_rollout_canary_and_rollback_of_a_broken_model(champion):
    cfg, wire, holdout = champion
    cfg = with_section(with_section(cfg, "serving", canary_requests=60, canary_percent=30), "backend", port=free_port())
    endpoint = LocalEndpoint(cfg)
    registry = Registry(cfg)

    def rollout(version: str) -> Rollout:
        spec = endpoint_spec(cfg, version)
        return Rollout(cfg, spec, LocalEndpointAdapter(cfg, spec, endpoint=endpoint))

    first = registry.alias_version(CHAMPION)
    rows = holdout_requests(cfg, 3)
    try:
        # First deployment: nothing served before, so the canary gives it all the traffic and checks it the same way.
        plan = rollout(first).stage()
        assert plan["new"] == "blue" and plan["old"] is None
        assert endpoint.call("/ping", auth=False)[0] == 503  # loaded, but no traffic yet
        rollout(first).health_check(plan)
        rollout(first).smoke_test(plan)
        canary = rollout(first).canary(plan)
        assert canary["requests"] >= cfg.serving.canary_requests and canary["errors"] == 0 and canary["percent"] == 100
        state = rollout(first).full_traffic(plan)
        assert state["served_version"] == first and state["url"] == endpoint.url == state["endpoint"]
        status, reply = endpoint.predict(rows)
        assert status == 200 and len(reply["predictions"]) == 3
        assert endpoint.state()["pid"] and endpoint.token and (endpoint.home / "token").stat().st_mode & 0o077 == 0

        # Deploying the version already served is a no-op.
        assert rollout(first).stage()["already_served"]

        # An upgrade goes to the other colour, through a canary share of real requests.
        source = registry.client.get_model_version(cfg.model_name, first).source
        second = registry.register(source, None, {})
        plan = rollout(second).stage()
        assert (plan["new"], plan["old"], plan["old_version"]) == ("green", "blue", first)
        rollout(second).health_check(plan)
        rollout(second).smoke_test(plan)
        canary = rollout(second).canary(plan)
        assert canary["requests"] > 0 and canary["errors"] == 0 and canary["percent"] == 30
        rollout(second).full_traffic(plan)
        variants = endpoint.variants()
        assert list(variants) == ["green"] and variants["green"]["version"] == second and variants["green"]["weight"] == 100

        # A broken model forced onto `champion`: it loads and passes the health check, fails the
        # smoke test, and everything goes back.
        third = registry.register(broken_model_uri(cfg, holdout), None, {})
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, third)
        plan = rollout(third).stage()
        assert plan["new"] == "blue" and read_endpoint_state(cfg)["rollout"] == plan  # kept for the rollback
        rollout(third).health_check(plan)
        with pytest.raises(DeploymentFailed, match=f"smoke test of v{third}"):
            rollout(third).smoke_test(plan)
        # ml_deploy's rollback: the backend restores the traffic, then alias `champion` goes back
        result = backend_for(cfg).rollback(third)
        assert read_endpoint_state(cfg)["rollout"] is None  # nothing left for a later rollback to undo
        assert result["serving"] == second and "smoke test" in result["reason"]
        assert registry.alias_version(CHAMPION) == second
        assert list(endpoint.variants()) == ["green"]
        status, reply = endpoint.predict(rows)
        assert status == 200 and all(0 <= p["probability"] <= 1 for p in reply["predictions"])
        tags = registry.client.get_model_version(cfg.model_name, third).tags
        assert tags["mlfactory.deployment"] == "rolled_back" and "smoke test" in tags["mlfactory.deployment_reason"]
        assert registry.client.get_model_version(cfg.model_name, second).tags["mlfactory.deployment"] == "serving"
    finally:
        endpoint.stop()
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, first)  # as the fixture left it
    assert not endpoint.alive()


def test_an_endpoint_run_elsewhere_is_waited_for_and_never_started_here(cfg):
    """local.endpoint_url (docker-compose's model-server, a Kubernetes Service): ml_deploy drives that server and
    starts none of its own; one that does not answer fails the deploy, naming the setting."""
    port = free_port()
    elsewhere = with_section(cfg, "backend", endpoint_url=f"http://127.0.0.1:{port}",
                             admin_url=f"http://127.0.0.1:{port + 1}")
    endpoint = LocalEndpoint(elsewhere)
    assert endpoint.url == f"http://127.0.0.1:{port}" and endpoint.admin_url == f"http://127.0.0.1:{port + 1}"
    with pytest.raises(DeploymentFailed, match=r"local.admin_url.*did not answer /live within 2s"):
        endpoint.ensure_running(timeout=2)
    assert "pid" not in endpoint.state() and not endpoint.log_file.exists()  # nothing was started

    # an admin_url that reaches something else (here a listener answering in another protocol, as a gRPC port
    # does) is not taken for the model server either
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port + 1))
        listener.listen()

        def answer_garbage():
            connection, _ = listener.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00 not HTTP/1.1\r\n\r\n")

        threading.Thread(target=answer_garbage, daemon=True).start()
        assert not endpoint.alive()


def test_a_model_that_raises_and_a_server_killed_mid_canary_are_rolled_back(champion):
    """A model that loads but raises on every prediction fails its smoke test and is rolled back; the server
    killed with -9 in the middle of a canary fails the canary, and the rollback starts it again with the old
    version alone on all traffic: never a split left on a dead variant. `champion` is restored each time."""
    import os
    import signal
    import threading
    import time

    cfg, _, holdout = champion
    cfg = with_section(with_section(cfg, "serving", canary_requests=3000, canary_percent=50), "backend", port=free_port())
    endpoint, registry = LocalEndpoint(cfg), Registry(cfg)
    first = registry.alias_version(CHAMPION)
    rows = holdout_requests(cfg, 3)

    def rollout(version: str) -> Rollout:
        spec = endpoint_spec(cfg, version)
        return Rollout(cfg, spec, LocalEndpointAdapter(cfg, spec, endpoint=endpoint))

    def roll_back(version: str) -> dict:  # ml_deploy's `rollback` task
        return backend_for(cfg).rollback(version)

    try:
        plan = rollout(first).stage()
        for step in (rollout(first).health_check, rollout(first).smoke_test, rollout(first).canary,
                     rollout(first).full_traffic):
            step(plan)

        raises = registry.register(broken_model_uri(cfg, holdout, "raises"), None, {})
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, raises)
        plan = rollout(raises).stage()
        rollout(raises).health_check(plan)  # it loads: only predicting shows it
        with pytest.raises(DeploymentFailed, match=f"smoke test of v{raises}.*answered 500.*failed"):
            rollout(raises).smoke_test(plan)
        assert roll_back(raises)["serving"] == first and registry.alias_version(CHAMPION) == first
        assert {v["name"]: v["weight"] for v in endpoint.variants().values()} == {"blue": 100}

        second = registry.register(registry.client.get_model_version(cfg.model_name, first).source, None, {})
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, second)
        plan = rollout(second).stage()
        rollout(second).health_check(plan)
        rollout(second).smoke_test(plan)
        pid = endpoint.state()["pid"]
        failed = []

        def canary():
            try:
                rollout(second).canary(plan)
            except DeploymentFailed as err:
                failed.append(str(err))

        worker = threading.Thread(target=canary)
        worker.start()
        while worker.is_alive() and endpoint.variants().get("green", {}).get("requests", 0) < 20:
            time.sleep(0.05)  # the canary is under way on the split
        os.killpg(pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert failed and "the endpoint stopped answering" in failed[0], failed
        assert not endpoint.alive()
        result = roll_back(second)
        assert result["serving"] == first and registry.alias_version(CHAMPION) == first
        assert endpoint.state()["pid"] != pid  # started again by the rollback ...
        assert {v["name"]: (v["weight"], v["version"]) for v in endpoint.variants().values()} == {"blue": (100, first)}
        status, reply = endpoint.predict(rows)  # ... serving the old version alone
        assert status == 200 and len(reply["predictions"]) == 3
        assert registry.client.get_model_version(cfg.model_name, second).tags["mlfactory.deployment"] == "rolled_back"
    finally:
        endpoint.stop()
        registry.client.set_registered_model_alias(cfg.model_name, CHAMPION, "1")  # as the fixture left it
