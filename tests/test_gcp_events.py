"""GCS bucket events for the gcp backend, for real over HTTP: fake-gcs-server publishing its OBJECT_FINALIZE
notifications to the Pub/Sub emulator, read by the AssetWatcher trigger through the google provider's
PubSubAsyncHook; and the polling fallback listing fake-gcs-server through GCSHook."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import GCP_PROJECT, empty_bucket, pubsub_subscription

from mlfactory.backends.gcp.events import NotANotification, gcs_landing_event

pytestmark = pytest.mark.gcp
PREFIX = "landing/"


def put(bucket: str, key: str, data: bytes) -> None:
    from mlfactory import storage

    storage.write_bytes(f"gs://{bucket}/{key}", data)


def pending_messages(subscription: str) -> int:
    """Messages on the subscription nobody has acknowledged (pulled and left unacknowledged: a nack makes them
    deliverable again at once)."""
    from google.cloud import pubsub_v1

    from google.api_core.exceptions import DeadlineExceeded

    subscriber = pubsub_v1.SubscriberClient()
    path = f"projects/{GCP_PROJECT}/subscriptions/{subscription}"
    try:
        received = subscriber.pull(subscription=path, max_messages=1000, timeout=5, retry=None).received_messages
    except DeadlineExceeded:
        return 0
    if received:
        subscriber.modify_ack_deadline(subscription=path, ack_ids=[m.ack_id for m in received], ack_deadline_seconds=0)
    return len(received)


async def take(events, n: int, timeout: float = 60) -> list[dict]:
    return [(await asyncio.wait_for(anext(events), timeout)).payload for _ in range(n)]


def test_a_burst_of_objects_gives_one_event_each_acknowledged_after_emitting(gcp_emulators):
    from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger

    bucket = "mlf-events-burst"
    empty_bucket(f"gs://{bucket}")
    subscription = pubsub_subscription(gcp_emulators, "burst-sub")
    names = [f"landing/part {i:02d}.csv" for i in range(50)]
    with ThreadPoolExecutor(8) as pool:  # 50 objects landing at once
        list(pool.map(lambda name: put(bucket, name, b"a,b\n1,2\n"), names))
    put(bucket, "elsewhere/x.csv", b"a\n1\n")  # outside the prefix: acknowledged, no event
    trigger = GcsNotificationTrigger(subscription, GCP_PROJECT, bucket, PREFIX, max_messages=20)
    assert trigger.serialize()[0] == "mlfactory_airflow.backends.gcp.triggers.GcsNotificationTrigger"
    assert GcsNotificationTrigger(**trigger.serialize()[1]).subscription == subscription  # what the triggerer rebuilds

    async def scenario():
        events = trigger.run()
        first = await take(events, 50)
        assert sorted(e["key"] for e in first) == names  # each object once, none lost
        sample = first[0]
        assert sample["uri"] == f"gs://{bucket}/{sample['key']}" and sample["size"] == 8 and sample["generation"]
        assert sample["md5"] and sample["crc32c"] and sample["etag"] == f"8:{sample['generation']}"

        # the same notification again (Pub/Sub delivers at least once): acknowledged, not announced again
        from google.cloud import pubsub_v1

        pubsub_v1.PublisherClient().publish(
            f"projects/{GCP_PROJECT}/topics/{gcp_emulators.topic}", json.dumps({"size": "8"}).encode(),
            eventType="OBJECT_FINALIZE", bucketId=bucket, objectId=sample["key"], objectGeneration=sample["generation"],
            payloadFormat="JSON_API_V1").result()
        put(bucket, sample["key"], b"a,b\n1,2\n3,4\n")  # an overwrite: a new generation, announced
        (again,) = await take(events, 1)
        assert again["key"] == sample["key"] and again["generation"] != sample["generation"] and again["size"] == 12
        with pytest.raises(TimeoutError):  # nothing else to announce; the loop acknowledges what it read
            await asyncio.wait_for(anext(events), 4)
        await events.aclose()

    asyncio.run(scenario())
    assert pending_messages(subscription) == 0


def test_a_notification_is_acknowledged_only_once_its_event_is_out(gcp_emulators):
    """A triggerer that stops after emitting one event leaves the rest of its pull unacknowledged: the next
    one gets them again (here with an empty watermark, as if the first had died before saving it)."""
    from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger

    bucket = "mlf-events-ack"
    empty_bucket(f"gs://{bucket}")
    subscription = pubsub_subscription(gcp_emulators, "ack-sub")
    for i in range(3):
        put(bucket, f"landing/{i}.csv", b"a\n1\n")

    async def first_only():
        events = GcsNotificationTrigger(subscription, GCP_PROJECT, bucket, PREFIX).run()
        (event,) = await take(events, 1)
        await events.aclose()  # dies right after emitting: nothing acknowledged
        return event

    async def all_of_them():
        events = GcsNotificationTrigger(subscription, GCP_PROJECT, bucket, PREFIX).run()
        got = await take(events, 3, timeout=60)  # redelivered once the 10 s ack deadline passes
        await events.aclose()
        return got

    first = asyncio.run(first_only())
    again = asyncio.run(all_of_them())
    assert first["key"] in {e["key"] for e in again} and len({e["key"] for e in again}) == 3


def test_a_refused_acknowledgement_loses_nothing_and_announces_nothing_twice(gcp_emulators, monkeypatch):
    """Pub/Sub refusing an Acknowledge (a deadline, an unavailable backend) must not stop the watcher: a
    stopped watcher restarts and fires for what waits, an extra ml_ingest run (seen in CI). The messages
    come again after the ack deadline and are acknowledged then, each object announced once."""
    import grpc
    from gcp_recorder import PubSubRecorder

    from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger

    bucket = "mlf-events-ack-refused"
    empty_bucket(f"gs://{bucket}")
    subscription = pubsub_subscription(gcp_emulators, "ack-refused-sub")
    proxy = PubSubRecorder(gcp_emulators.pubsub)
    proxy.fail("Subscriber/Acknowledge", grpc.StatusCode.DEADLINE_EXCEEDED, times=2)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", proxy.host)  # only the trigger's client goes through the proxy
    try:
        for i in range(3):
            put(bucket, f"landing/{i}.csv", b"a\n1\n")

        async def scenario():
            events = GcsNotificationTrigger(subscription, GCP_PROJECT, bucket, PREFIX).run()
            got = await take(events, 3)
            with pytest.raises(TimeoutError):  # the refused ones come again (10 s deadline): dropped, acknowledged
                await asyncio.wait_for(anext(events), 25)
            await events.aclose()
            return got

        got = asyncio.run(scenario())
    finally:
        proxy.stop()
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", gcp_emulators.pubsub)
    assert sorted(e["key"] for e in got) == [f"landing/{i}.csv" for i in range(3)]
    assert not proxy.failures["Subscriber/Acknowledge"]  # both refusals were played
    assert pending_messages(subscription) == 0


def test_a_message_that_is_not_a_notification_stays_unacknowledged(gcp_emulators):
    from google.cloud import pubsub_v1

    from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger

    subscription = pubsub_subscription(gcp_emulators, "junk-sub")
    pubsub_v1.PublisherClient().publish(f"projects/{GCP_PROJECT}/topics/{gcp_emulators.topic}", b"hello").result()

    async def scenario():
        events = GcsNotificationTrigger(subscription, GCP_PROJECT, "any-bucket", PREFIX).run()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 4)
        await events.aclose()

    asyncio.run(scenario())
    # an unacknowledged message is delivered again once the subscription's ack deadline (10 s) has passed
    assert any(pending_messages(subscription) == 1 for _ in range(5))


def test_the_notification_parser():
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "b1", "objectId": "landing/a é.csv",
                  "objectGeneration": "17", "payloadFormat": "JSON_API_V1"}
    data = json.dumps({"name": "landing/a é.csv", "size": "5", "md5Hash": "x==", "crc32c": "y==", "generation": "17"})
    event = gcs_landing_event(attributes, data.encode(), "b1", PREFIX)
    assert event == {"uri": "gs://b1/landing/a é.csv", "bucket": "b1", "key": "landing/a é.csv", "size": 5,
                     "generation": "17", "md5": "x==", "crc32c": "y==", "etag": "5:17"}
    assert gcs_landing_event({**attributes, "eventType": "OBJECT_DELETE"}, data.encode(), "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "eventType": "OBJECT_METADATA_UPDATE"}, b"", "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "bucketId": "other"}, data.encode(), "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "objectId": "raw/x.csv"}, data.encode(), "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "objectId": "landing/dir/"}, b"", "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "objectId": "landing/.a.csv.1f2e.tmp"}, b"", "b1", PREFIX) is None
    assert gcs_landing_event({**attributes, "payloadFormat": "NONE"}, b"", "b1", PREFIX)["size"] == -1
    with pytest.raises(NotANotification, match="no eventType"):
        gcs_landing_event({}, b"hello", "b1", PREFIX)
    with pytest.raises(NotANotification, match="not the object's JSON"):
        gcs_landing_event(attributes, b"{nope", "b1", PREFIX)


def gcp_pipeline(tmp_path, bucket: str, **gcp) -> str:
    import yaml

    from mlfactory.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="gcp", gcp={"project": GCP_PROJECT, "image_uri": "img", **gcp})
    raw["storage"]["bucket"] = f"gs://{bucket}"
    raw["ingest"].update(poll_interval_s=0.2, settle_s=0)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_config_picks_the_subscription_or_the_polling_fallback(tmp_path):
    from mlfactory.config import ConfigError, load_config
    from mlfactory_airflow.assets import pipeline_assets
    from mlfactory_airflow.backends.gcp.triggers import GcsNotificationTrigger, GcsPrefixPollTrigger

    cfg = load_config(gcp_pipeline(tmp_path, "b1", pubsub_subscription="landing-sub", conn_id="gcp_prod"))
    trigger = pipeline_assets(cfg).landing.watchers[0].trigger
    assert isinstance(trigger, GcsNotificationTrigger)
    assert (trigger.subscription, trigger.project_id, trigger.bucket, trigger.prefix, trigger.gcp_conn_id) == (
        "landing-sub", GCP_PROJECT, "b1", PREFIX, "gcp_prod")
    trigger = pipeline_assets(load_config(gcp_pipeline(tmp_path, "b1"))).landing.watchers[0].trigger
    assert isinstance(trigger, GcsPrefixPollTrigger) and GcsPrefixPollTrigger(**trigger.serialize()[1]).poll_interval == 0.2
    path = tmp_path / "pipeline.yaml"
    path.write_text(path.read_text().replace("gs://b1", "s3://b1"))
    with pytest.raises(ConfigError, match="backend gcp needs a gs:// bucket"):
        load_config(path)
    path.write_text(path.read_text().replace("s3://b1", "gs://b1").replace("rollback_alarms: []", "rollback_alarms: [p95]"))
    with pytest.raises(ConfigError, match="serving.rollback_alarms: the gcp backend reads no alert state"):
        load_config(path)  # refused, never silently ignored


def test_without_a_subscription_the_prefix_is_polled_each_generation_once(gcp_emulators, tmp_path):
    from mlfactory.config import load_config
    from mlfactory_airflow.assets import pipeline_assets

    bucket = "mlf-events-poll"
    empty_bucket(f"gs://{bucket}")
    trigger = pipeline_assets(load_config(gcp_pipeline(tmp_path, bucket))).landing.watchers[0].trigger
    put(bucket, "landing/a.csv", b"a\n1\n")
    put(bucket, "landing/_tmp/partial.csv", b"a\n")  # an in-progress upload folder: ignored
    put(bucket, "elsewhere/b.csv", b"a\n1\n")

    async def scenario():
        events = trigger.run()
        # the watcher starts with a.csv landed and not ingested (no entry in raw/_landed/): one event for it
        waiting = (await asyncio.wait_for(anext(events), 30)).payload
        assert waiting == {"waiting": 1, "first": f"gs://{bucket}/landing/a.csv"}
        (first,) = await take(events, 1)
        assert (first["uri"], first["size"]) == (f"gs://{bucket}/landing/a.csv", 4)
        assert first["etag"] == f"4:{first['generation']}"  # the fingerprint a notification gives the same generation
        put(bucket, "landing/c.csv", b"a\n2\n")
        (second,) = await take(events, 1)
        assert second["key"] == "landing/c.csv"
        put(bucket, "landing/a.csv", b"a\n1\n")  # the same bytes again: still a new generation, announced
        (third,) = await take(events, 1)
        assert third["key"] == "landing/a.csv" and third["generation"] != first["generation"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 2)
        await events.aclose()

    asyncio.run(scenario())
