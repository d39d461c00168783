"""The `aws` backend's triggers.

Bucket events (AssetWatcher event triggers):

- ``S3EventQueueTrigger``: S3 event notifications delivered to an SQS queue. Set up once per bucket
  (docs/backends/aws.md, "Setting it up"): an event notification for ``s3:ObjectCreated:*`` with the landing
  prefix as filter, sending to a queue this trigger reads.
- ``S3PrefixPollTrigger``: the fallback for a bucket without a queue, listing the prefix.

Imported by every DAG parse (the landing AssetWatcher), so light: the deferral triggers, built on the amazon
provider's SageMakerTrigger (boto3), are in ``sagemaker_triggers``, imported by the triggerer and workers only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from mlfactory_airflow.triggers.watermark import WatermarkedTrigger


class S3EventQueueTrigger(WatermarkedTrigger):
    """One event per object created under ``s3://bucket/prefix``, read from the notification queue.

    Used as an AssetWatcher trigger, through the amazon provider's SqsHook (``aws_conn_id``; an
    ``endpoint_url`` in the connection's extra points it at an emulator). Each ObjectCreated record
    becomes one event {uri, bucket, key (URL-decoded), size, etag}. A message is deleted only after
    every event in it has been emitted, so a triggerer that dies in between gets the message again
    (at least once); the (key, ETag) pairs already announced are kept in the Asset's state store,
    so a redelivered or duplicated notification does not ingest the same object twice, while a new
    version of a key (a new ETag) does. ``s3:TestEvent`` and other event types are acknowledged
    and dropped. A message that is not an S3 notification is logged and left on the queue: its
    redrive policy moves it to a dead-letter queue, nothing is lost.
    """

    def __init__(self, queue_url: str, bucket: str, prefix: str, aws_conn_id: str = "aws_default",
                 region_name: str | None = None, wait_time_s: int = 20, max_messages: int = 10,
                 ledger_uri: str | None = None) -> None:
        super().__init__()
        self.queue_url, self.bucket, self.prefix = queue_url, bucket, prefix
        self.aws_conn_id, self.region_name = aws_conn_id, region_name
        self.wait_time_s, self.max_messages = wait_time_s, max_messages
        self.ledger_uri = ledger_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"queue_url": self.queue_url, "bucket": self.bucket, "prefix": self.prefix, "aws_conn_id": self.aws_conn_id,
                 "region_name": self.region_name, "wait_time_s": self.wait_time_s, "max_messages": self.max_messages,
                 "ledger_uri": self.ledger_uri})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook
        from mlfactory.backends.aws.events import NotANotification, s3_landing_events

        async for event in self.waiting_at_start(f"s3://{self.bucket}/{self.prefix}", 0):
            yield event
        watermark = await self.load_watermark()
        hook = SqsHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)
        self.log.info("reading S3 notifications for s3://%s/%s from %s (%d objects already announced)",
                      self.bucket, self.prefix, self.queue_url, len(watermark.seen))
        async with await hook.get_async_conn() as client:
            while True:
                response = await client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=self.max_messages,
                                                        WaitTimeSeconds=self.wait_time_s)
                for message in response.get("Messages", []):
                    try:
                        events = s3_landing_events(message.get("Body", ""), self.bucket, self.prefix)
                    except NotANotification as err:
                        self.log.error("message %s on %s is not an S3 event notification (%s); left on the queue for "
                                       "its dead-letter queue", message.get("MessageId"), self.queue_url, err)
                        continue
                    for event in events:
                        if watermark.announced(event["key"], event["etag"]):
                            self.log.info("already announced: %s (ETag %s)", event["uri"], event["etag"])
                            continue
                        self.log.info("new object %s (%d bytes)", event["uri"], event["size"])
                        yield TriggerEvent(event)
                        watermark.remember(event["key"], event["etag"])
                        await self.save_watermark(watermark)
                    await client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])


class S3PrefixPollTrigger(WatermarkedTrigger):
    """The fallback for a bucket without event notifications: polls ListObjectsV2 under
    ``s3://bucket/prefix`` every ``poll_interval`` seconds, in the triggerer (like a deferrable
    sensor, it holds no worker slot), and emits the same events as ``S3EventQueueTrigger``
    {uri, bucket, key, size, etag} for each object new or changed (a new ETag), once each.

    Objects modified less than ``settle_seconds`` ago wait for the next poll. The watermark is the
    same (key -> ETag) as the queue trigger's, so switching between them announces nothing twice.
    Polling costs one LIST request per ``poll_interval`` per 1000 objects under the prefix: prefer
    notifications for busy buckets.
    """

    def __init__(self, bucket: str, prefix: str, aws_conn_id: str = "aws_default", region_name: str | None = None,
                 poll_interval: float = 60.0, settle_seconds: float = 5.0, ledger_uri: str | None = None) -> None:
        super().__init__()
        self.bucket, self.prefix, self.aws_conn_id, self.region_name = bucket, prefix, aws_conn_id, region_name
        self.poll_interval, self.settle_seconds = poll_interval, settle_seconds
        self.ledger_uri = ledger_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"bucket": self.bucket, "prefix": self.prefix, "aws_conn_id": self.aws_conn_id,
                 "region_name": self.region_name, "poll_interval": self.poll_interval,
                 "settle_seconds": self.settle_seconds, "ledger_uri": self.ledger_uri})

    def _listing(self, s3) -> list:
        from mlfactory.storage import ObjectInfo, is_hidden

        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                key, etag = obj["Key"], obj["ETag"].strip('"')
                if is_hidden(key[len(self.prefix):]):
                    continue
                found.append(ObjectInfo(f"s3://{self.bucket}/{key}", key, int(obj["Size"]), etag,
                                        obj["LastModified"].timestamp()))
        return found

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        s3 = S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name).conn
        self.log.info("listing s3://%s/%s (no notification queue configured)", self.bucket, self.prefix)
        async for event in self.waiting_at_start(f"s3://{self.bucket}/{self.prefix}", self.settle_seconds):
            yield event
        async for event in self.poll(lambda: self._listing(s3),
                                     lambda obj: {"uri": obj.uri, "bucket": self.bucket, "key": obj.key, "size": obj.size,
                                                  "etag": obj.fingerprint},
                                     self.poll_interval, self.settle_seconds):
            yield event

