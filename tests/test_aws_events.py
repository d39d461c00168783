"""S3 -> SQS bucket events for the aws backend, against moto's server over HTTP: the S3 notification
setup, moto's delivery (a TestEvent first, URL-encoded keys), and the AssetWatcher trigger reading
the queue through the amazon provider's SqsHook."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from mlfactory.backends.aws.events import NotANotification, s3_landing_events

BUCKET, PREFIX = "mlfactory-data", "landing/"


@pytest.fixture
def aws_resources(moto_server, monkeypatch):
    """A bucket whose landing prefix notifies a queue, and an Airflow connection to moto."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AIRFLOW_CONN_MOTO", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"}}))
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="mlfactory-landing")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [{
        "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": PREFIX}]}}}]})
    return s3, sqs, queue_url


def messages_on(sqs, queue_url) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def test_the_trigger_announces_each_new_object_once_and_acknowledges_after_emitting(aws_resources):
    from mlfactory_airflow.backends.aws.triggers import S3EventQueueTrigger

    s3, sqs, queue_url = aws_resources
    s3.put_object(Bucket=BUCKET, Key="landing/june batch+1.csv", Body=b"a,b\n1,2\n")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/x.csv", Body=b"a\n1\n")  # outside the prefix: no notification
    assert messages_on(sqs, queue_url) == 2  # moto's s3:TestEvent, then the landing object

    trigger = S3EventQueueTrigger(queue_url, BUCKET, PREFIX, aws_conn_id="moto", wait_time_s=1)
    assert trigger.serialize()[0] == "mlfactory_airflow.backends.aws.triggers.S3EventQueueTrigger"

    async def scenario():
        events = trigger.run()
        first = await asyncio.wait_for(anext(events), 30)
        payload = first.payload
        assert payload["uri"] == f"s3://{BUCKET}/landing/june batch+1.csv"  # URL-decoded ('+' is a space on the wire)
        assert payload["key"] == "landing/june batch+1.csv" and payload["size"] == 8
        head = s3.head_object(Bucket=BUCKET, Key="landing/june batch+1.csv")
        assert payload["etag"] == head["ETag"].strip('"')
        assert messages_on(sqs, queue_url) == 1  # emitted, not yet acknowledged (the TestEvent was)

        # the same notification again (SQS delivers at least once): acknowledged, not announced again
        original = json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                            "s3": {"bucket": {"name": BUCKET}, "object": {
                                                "key": "landing/june+batch%2B1.csv", "size": 8, "eTag": payload["etag"]}}}]})
        sqs.send_message(QueueUrl=queue_url, MessageBody=original)
        s3.put_object(Bucket=BUCKET, Key="landing/june batch+1.csv", Body=b"a,b\n1,2\n3,4\n")  # a new version
        second = await asyncio.wait_for(anext(events), 30)
        assert second.payload["key"] == "landing/june batch+1.csv" and second.payload["size"] == 12
        assert second.payload["etag"] != payload["etag"]
        with pytest.raises(TimeoutError):  # nothing else to announce; the loop acknowledges what it read
            await asyncio.wait_for(anext(events), 4)
        await events.aclose()

    asyncio.run(scenario())
    assert messages_on(sqs, queue_url) == 0


def test_a_message_that_is_not_a_notification_stays_on_the_queue(aws_resources):
    from mlfactory_airflow.backends.aws.triggers import S3EventQueueTrigger

    _, sqs, queue_url = aws_resources
    sqs.purge_queue(QueueUrl=queue_url)
    sqs.send_message(QueueUrl=queue_url, MessageBody="hello")
    trigger = S3EventQueueTrigger(queue_url, BUCKET, PREFIX, aws_conn_id="moto", wait_time_s=1)

    async def scenario():
        events = trigger.run()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 4)
        await events.aclose()

    asyncio.run(scenario())
    assert messages_on(sqs, queue_url) == 1


def test_the_notification_parser():
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:CompleteMultipartUpload",
              "s3": {"bucket": {"name": BUCKET}, "object": {"key": "landing/a%C3%A9+b.parquet", "size": 5, "eTag": "abc"}}}
    removed = {**record, "eventName": "ObjectRemoved:Delete"}
    other = {**record, "s3": {"bucket": {"name": BUCKET}, "object": {"key": "raw/x", "size": 1, "eTag": "d"}}}
    events = s3_landing_events(json.dumps({"Records": [record, removed, other]}), BUCKET, PREFIX)
    assert [(e["key"], e["size"], e["etag"]) for e in events] == [("landing/aé b.parquet", 5, "abc")]
    wrapped = json.dumps({"Type": "Notification", "Message": json.dumps({"Records": [record]})})  # S3 -> SNS -> SQS
    assert s3_landing_events(wrapped, BUCKET, PREFIX) == events
    assert s3_landing_events(json.dumps({"Event": "s3:TestEvent", "Bucket": BUCKET}), BUCKET, PREFIX) == []
    for bad in ("hello", "[1]", json.dumps({"foo": 1})):
        with pytest.raises(NotANotification):
            s3_landing_events(bad, BUCKET, PREFIX)


def test_the_aws_config_watches_the_landing_prefix_through_the_queue(tmp_path, monkeypatch):
    import yaml

    from mlfactory.config import DEFAULT_CONFIG, load_config
    from mlfactory_airflow.assets import pipeline_assets
    from mlfactory_airflow.backends.aws.triggers import S3EventQueueTrigger

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="aws", aws={"role_arn": "arn:aws:iam::123456789012:role/mlfactory", "image_uri": "img",
                                   "sqs_queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/landing",
                                   "region": "eu-west-1", "conn_id": "aws_prod"})
    raw["storage"]["bucket"] = f"s3://{BUCKET}"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    trigger = pipeline_assets(load_config(path)).landing.watchers[0].trigger
    assert isinstance(trigger, S3EventQueueTrigger)
    assert (trigger.bucket, trigger.prefix, trigger.aws_conn_id, trigger.region_name) == (BUCKET, PREFIX, "aws_prod", "eu-west-1")


def test_without_a_queue_the_landing_prefix_is_polled_each_object_once(aws_resources, tmp_path, moto_server, monkeypatch):
    import yaml

    from mlfactory.config import DEFAULT_CONFIG, load_config
    from mlfactory_airflow.assets import pipeline_assets
    from mlfactory_airflow.backends.aws.triggers import S3PrefixPollTrigger

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.update(backend="aws", aws={"role_arn": "arn:aws:iam::123456789012:role/mlfactory", "image_uri": "img", "conn_id": "moto"})
    raw["storage"]["bucket"] = f"s3://{BUCKET}"
    raw["ingest"].update(poll_interval_s=0.2, settle_s=0)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    trigger = pipeline_assets(load_config(path)).landing.watchers[0].trigger
    assert isinstance(trigger, S3PrefixPollTrigger) and (trigger.bucket, trigger.prefix) == (BUCKET, PREFIX)
    assert S3PrefixPollTrigger(**trigger.serialize()[1]).poll_interval == 0.2  # what the triggerer rebuilds

    s3, _, _ = aws_resources
    s3.put_object(Bucket=BUCKET, Key="landing/a.csv", Body=b"a\n1\n")
    s3.put_object(Bucket=BUCKET, Key="landing/_tmp/partial.csv", Body=b"a\n")  # an in-progress upload folder: ignored
    s3.put_object(Bucket=BUCKET, Key="elsewhere/b.csv", Body=b"a\n1\n")

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)  # the storage layer's (s3fs) view of the bucket

    async def scenario():
        events = trigger.run()
        # The watcher starts with a.csv landed and not ingested (no entry in raw/_landed/): one event for it.
        waiting = (await asyncio.wait_for(anext(events), 30)).payload
        assert waiting == {"waiting": 1, "first": f"s3://{BUCKET}/landing/a.csv"}
        first = (await asyncio.wait_for(anext(events), 30)).payload
        assert (first["uri"], first["size"]) == (f"s3://{BUCKET}/landing/a.csv", 4) and first["etag"]
        s3.put_object(Bucket=BUCKET, Key="landing/a.csv", Body=b"a\n1\n")  # same content, same ETag: not again
        s3.put_object(Bucket=BUCKET, Key="landing/c.csv", Body=b"a\n2\n")
        second = (await asyncio.wait_for(anext(events), 30)).payload
        assert second["key"] == "landing/c.csv"
        s3.put_object(Bucket=BUCKET, Key="landing/a.csv", Body=b"a\n1\n3\n")  # a new version of a key: announced
        third = (await asyncio.wait_for(anext(events), 30)).payload
        assert third["key"] == "landing/a.csv" and third["etag"] != first["etag"]
        await events.aclose()

    asyncio.run(scenario())
