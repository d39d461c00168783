"""Bucket-change trigger for the `aws` backend: S3 event notifications delivered to an SQS queue.

Set up once per bucket (README, "Pointing the project at AWS"): an event notification for
``s3:ObjectCreated:*`` with the landing prefix as filter, sending to a queue this trigger reads.
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
                 region_name: str | None = None, wait_time_s: int = 20, max_messages: int = 10) -> None:
        super().__init__()
        self.queue_url, self.bucket, self.prefix = queue_url, bucket, prefix
        self.aws_conn_id, self.region_name = aws_conn_id, region_name
        self.wait_time_s, self.max_messages = wait_time_s, max_messages

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"queue_url": self.queue_url, "bucket": self.bucket, "prefix": self.prefix, "aws_conn_id": self.aws_conn_id,
                 "region_name": self.region_name, "wait_time_s": self.wait_time_s, "max_messages": self.max_messages})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        from mlfactory.aws import NotANotification, s3_landing_events

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
