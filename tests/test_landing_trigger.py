"""The local bucket-change trigger: fires once per new or changed object, never again after a restart."""

import asyncio
import os
import time

from mlfactory_airflow.triggers.storage import StoragePrefixPollTrigger


class InMemoryAssetState:
    """Stands in for Airflow's asset state store (same aget/aset calls); the scheduler test uses the real one."""

    def __init__(self):
        self.values = {}

    async def aget(self, key, default=None):
        return self.values.get(key, default)

    async def aset(self, key, value):
        self.values[key] = value


def collect(trigger, seconds: float) -> list[dict]:
    async def run():
        events = []

        async def consume():
            async for event in trigger.run():
                events.append(event.payload)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(seconds)
        task.cancel()
        return events

    return asyncio.run(run())


def make_trigger(folder, state):
    trigger = StoragePrefixPollTrigger(prefix_uri=folder.as_uri(), poll_interval=0.05, settle_seconds=0.2)
    trigger.asset_state_store = state
    return trigger


def old(path, content):
    path.write_text(content)
    past = time.time() - 10
    os.utime(path, (past, past))


def test_fires_once_per_object_and_survives_a_restart(tmp_path):
    state = InMemoryAssetState()
    old(tmp_path / "a.csv", "1")
    old(tmp_path / "b.csv", "22")
    first = collect(make_trigger(tmp_path, state), 0.5)
    assert sorted(e["key"] for e in first) == ["a.csv", "b.csv"]
    assert {e["uri"] for e in first} == {(tmp_path / "a.csv").as_uri(), (tmp_path / "b.csv").as_uri()}
    # A new trigger instance (a restarted triggerer) reads the watermark and stays quiet...
    assert collect(make_trigger(tmp_path, state), 0.5) == []
    # ...until an object is added or changed.
    old(tmp_path / "c.csv", "333")
    old(tmp_path / "a.csv", "1 changed")
    assert sorted(e["key"] for e in collect(make_trigger(tmp_path, state), 0.5)) == ["a.csv", "c.csv"]


def test_waits_for_an_object_to_settle(tmp_path):
    state = InMemoryAssetState()
    (tmp_path / "fresh.csv").write_text("still being written")
    trigger = StoragePrefixPollTrigger(prefix_uri=tmp_path.as_uri(), poll_interval=0.05, settle_seconds=30)
    trigger.asset_state_store = state
    assert collect(trigger, 0.3) == []


def test_serializes_to_exactly_its_arguments(tmp_path):
    trigger = StoragePrefixPollTrigger(prefix_uri=tmp_path.as_uri(), poll_interval=3.0, settle_seconds=1.5)
    path, kwargs = trigger.serialize()
    assert path == "mlfactory_airflow.triggers.storage.StoragePrefixPollTrigger"
    assert kwargs == {"prefix_uri": tmp_path.as_uri(), "poll_interval": 3.0, "settle_seconds": 1.5,
                      "ledger_uri": None}
    assert StoragePrefixPollTrigger(**kwargs).serialize() == (path, kwargs)


def test_a_restarted_watcher_starts_a_run_for_objects_announced_but_never_ingested(tmp_path):
    """An event lost between the trigger and Airflow's database (a crash after the watermark was saved)
    strands nothing: the restarted watcher sees objects waiting in the landing area, not in ingestion's
    ledger, and fires one event for them; once they are ingested, a restart is quiet again."""
    from mlfactory.config import load_config
    from mlfactory.data.ingest import ingest_object, ledger_uri

    cfg = load_config()
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"bucket": tmp_path.as_uri()})})
    landing = tmp_path / "landing"
    landing.mkdir()
    old(landing / "a.csv", "x,y\n1,2\n")
    old(landing / "b.csv", "x,y\n3,4\n")
    state = InMemoryAssetState()
    ledger = ledger_uri(cfg)

    def watcher():
        trigger = StoragePrefixPollTrigger(prefix_uri=landing.as_uri(), poll_interval=0.05, settle_seconds=0.2,
                                           ledger_uri=ledger)
        trigger.asset_state_store = state
        return trigger

    assert sorted(e.get("key", "waiting") for e in collect(watcher(), 0.5)) == ["a.csv", "b.csv", "waiting"]
    # Announced (the watermark says so) but never ingested: the restarted watcher says they wait.
    assert collect(watcher(), 0.5) == [{"waiting": 2, "first": (landing / "a.csv").as_uri()}]
    for name in ("a.csv", "b.csv"):
        ingest_object(cfg, (landing / name).as_uri())
    assert collect(watcher(), 0.5) == []
