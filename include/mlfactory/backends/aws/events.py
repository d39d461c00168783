"""The `aws` backend's bucket events: S3 event notifications, delivered to SQS (directly or through SNS),
turned into ingestion events. Pure functions: the trigger that reads the queue is in
``mlfactory_airflow.backends.aws.triggers``."""

from __future__ import annotations

import json
from urllib.parse import unquote_plus

class NotANotification(ValueError):
    """An SQS message that is not an S3 event notification (nor one wrapped by SNS)."""


def s3_landing_events(body: str, bucket: str, prefix: str) -> list[dict]:
    """The ObjectCreated records of one SQS message body that fall under ``s3://bucket/prefix``, as
    ingestion events {uri, bucket, key, size, etag, sequencer}; keys URL-decoded (S3 sends them
    encoded: a space arrives as '+'). ``s3:TestEvent`` (sent when notifications are set up), other
    event types and other prefixes give no events. A body that is not a notification raises."""
    try:
        message = json.loads(body)
    except (json.JSONDecodeError, TypeError) as err:
        raise NotANotification(f"not JSON: {err}") from None
    if isinstance(message, dict) and message.get("Type") == "Notification" and "Message" in message:
        return s3_landing_events(message["Message"], bucket, prefix)  # S3 -> SNS -> SQS
    if not isinstance(message, dict):
        raise NotANotification(f"expected a JSON object, got {type(message).__name__}")
    if message.get("Event") == "s3:TestEvent":
        return []
    if not isinstance(message.get("Records"), list):
        raise NotANotification(f"no 'Records' list (keys: {sorted(message)[:10]})")
    events = []
    for record in message["Records"]:
        if record.get("eventSource") != "aws:s3" or not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        name, obj = (s3.get("bucket") or {}).get("name"), s3.get("object") or {}
        key = unquote_plus(obj.get("key", ""))
        if name != bucket or not key.startswith(prefix) or key.endswith("/"):
            continue
        events.append({"uri": f"s3://{name}/{key}", "bucket": name, "key": key, "size": int(obj.get("size") or 0),
                       "etag": str(obj.get("eTag") or obj.get("etag") or "").strip('"'), "sequencer": obj.get("sequencer", "")})
    return events
