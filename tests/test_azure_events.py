"""Blob events for the azure backend, for real over HTTP on Azurite: BlobCreated events in Event Grid's schema
(Azurite emits none, so the test writes them to the Storage Queue exactly as Event Grid does: one event per
message, base64 JSON, with the blob's real ETag and length), read by the AssetWatcher trigger; and the
polling fallback listing the container through the storage layer (adlfs)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import AZURITE_ACCOUNT, empty_bucket
from conftest import azure_blob_created as blob_created
from conftest import azure_queue as queue

pytestmark = pytest.mark.azure
PREFIX = "landing/"


def trigger_for(container: str, queue_name: str, **kwargs):
    from mlfactory_airflow.backends.azure.triggers import BlobQueueEventTrigger

    trigger = BlobQueueEventTrigger(queue=queue_name, storage_conn_id="wasb_default", account=AZURITE_ACCOUNT,
                                    scheme="abfs", container=container, prefix=PREFIX, poll_interval=0.2, **kwargs)
    path, rebuilt = trigger.serialize()  # what the triggerer rebuilds
    assert path == "mlfactory_airflow.backends.azure.triggers.BlobQueueEventTrigger"
    return BlobQueueEventTrigger(**rebuilt)


async def take(events, n: int, timeout: float = 60) -> list[dict]:
    return [(await asyncio.wait_for(anext(events), timeout)).payload for _ in range(n)]


def test_a_burst_of_blobs_gives_one_event_each_deleted_after_emitting(azurite):
    container, events_queue = "mlf-azure-burst", queue(azurite, "burst-events")
    empty_bucket(f"abfs://{container}")
    names = [f"landing/part {i:02d}.csv" for i in range(50)]
    with ThreadPoolExecutor(8) as pool:  # 50 blobs landing at once, their events in any order
        messages = list(pool.map(lambda name: blob_created(azurite, container, name, b"a,b\n1,2\n"), names))
    messages.append(blob_created(azurite, container, "elsewhere/x.csv", b"a\n1\n"))  # outside the prefix
    messages.append(messages[7])  # Event Grid delivers at least once: a duplicate
    for message in messages:
        events_queue.send_message(message)
    trigger = trigger_for(container, "burst-events")

    async def scenario():
        events = trigger.run()
        first = await take(events, 50)
        assert sorted(e["key"] for e in first) == [n[len(PREFIX):] for n in names]  # each blob once, none lost
        sample = first[0]
        assert sample["uri"] == f"abfs://{container}/{PREFIX}{sample['key']}" and sample["size"] == 8
        assert sample["fingerprint"] == f"8:{sample['etag']}"
        # an overwrite: a new ETag of the same name, announced
        events_queue.send_message(blob_created(azurite, container, PREFIX + sample["key"], b"a,b\n1,2\n3,4\n"))
        (again,) = await take(events, 1)
        assert again["key"] == sample["key"] and again["etag"] != sample["etag"] and again["size"] == 12
        with pytest.raises(TimeoutError):  # the duplicate and the other prefix: dropped
            await take(events, 1, timeout=3)
        return sample, again

    sample, again = asyncio.run(scenario())
    assert events_queue.peek_messages(max_messages=32) == []  # every message deleted once handled

    # the polling fallback gives the same blobs the same fingerprints: switching announces nothing twice
    from mlfactory import storage

    listed = {o.key: o.fingerprint for o in storage.list_objects(f"abfs://{container}/{PREFIX}")}
    assert listed[sample["key"]] == again["fingerprint"] and len(listed) == 50


def test_a_message_is_deleted_only_after_its_event_is_emitted(azurite):
    container, events_queue = "mlf-azure-crash", queue(azurite, "crash-events")
    empty_bucket(f"abfs://{container}")
    events_queue.send_message(blob_created(azurite, container, "landing/a.csv", b"a\n1\n"))
    trigger = trigger_for(container, "crash-events", visibility_timeout=1)

    async def crash_after_receiving():
        events = trigger.run()
        await take(events, 1)
        await events.aclose()  # the triggerer dies before the message is deleted

    asyncio.run(crash_after_receiving())
    import time

    time.sleep(1.5)  # the visibility timeout ends: the message is back for the next triggerer
    (back,) = events_queue.peek_messages()
    assert back.dequeue_count == 1


def test_a_message_that_is_not_an_event_goes_to_the_poison_queue_after_its_retries(azurite, monkeypatch):
    container, events_queue = "mlf-azure-poison", queue(azurite, "poison-events")
    empty_bucket(f"abfs://{container}")
    poison = queue(azurite, "poison-events-poison")
    events_queue.send_message("this is not an Event Grid event")
    events_queue.send_message(blob_created(azurite, container, "landing/good.csv", b"a\n1\n"))
    trigger = trigger_for(container, "poison-events", visibility_timeout=1, max_dequeue_count=2)
    from mlfactory_airflow.backends.azure import hooks

    seen, make = [], hooks.queue_client  # every queue request the trigger makes, for the RBAC check below
    monkeypatch.setattr(hooks, "queue_client", lambda *a, **kw: make(
        *a, raw_request_hook=lambda r: seen.append((r.http_request.method, r.http_request.url)), **kw))

    async def scenario():
        events = trigger.run()
        (good,) = await take(events, 1)
        assert good["key"] == "good.csv"
        with pytest.raises(TimeoutError):  # meanwhile delivered twice (left after the first), then moved
            await take(events, 1, timeout=4)

    asyncio.run(scenario())
    assert events_queue.peek_messages(max_messages=32) == []
    (moved,) = poison.peek_messages()
    assert moved.content == "this is not an Event Grid event"
    from azure_rbac import assert_role_covers

    assert assert_role_covers(seen) == {f"Microsoft.Storage/storageAccounts/queueServices/queues/{a}" for a in (
        "messages/process/action", "messages/delete", "messages/add/action", "write")}


def test_the_polling_fallback_announces_each_blob_version_once(azurite):
    from mlfactory import storage
    from mlfactory_airflow.triggers.storage import StoragePrefixPollTrigger

    container = "mlf-azure-poll"
    empty_bucket(f"abfs://{container}")
    landing = f"abfs://{container}/landing"
    for i in range(5):
        storage.write_bytes(f"{landing}/f{i}.csv", b"a\n1\n")
    storage.write_bytes(f"{landing}/.hidden.tmp", b"x")
    trigger = StoragePrefixPollTrigger(prefix_uri=landing, poll_interval=0.2, settle_seconds=0)

    async def scenario():
        events = trigger.run()
        first = await take(events, 5)
        assert sorted(e["key"] for e in first) == [f"f{i}.csv" for i in range(5)]
        storage.write_bytes(f"{landing}/f0.csv", b"a\n1\n2\n")  # overwritten: a new ETag
        (again,) = await take(events, 1)
        assert again["key"] == "f0.csv" and again["fingerprint"] != first[0]["fingerprint"]
        with pytest.raises(TimeoutError):
            await take(events, 1, timeout=2)
        await events.aclose()

    asyncio.run(scenario())
