"""The `azure` backend's bucket events: ``Microsoft.Storage.BlobCreated`` events, as an Event Grid
subscription delivers them to a Storage Queue (one event per message, the JSON base64-encoded), turned
into ingestion events. Pure functions: the trigger that reads the queue is in
``mlfactory_airflow.backends.azure.triggers``."""

from __future__ import annotations

import base64
import binascii
import json
import re

from mlfactory.storage import is_hidden

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
_SUBJECT = re.compile(r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<name>.+)$")


class NotAnEvent(ValueError):
    """A queue message that is not an Event Grid (or CloudEvents) storage event."""


def decode(message: str | bytes) -> dict:
    """A queue message's event: base64 JSON as Event Grid writes it (plain JSON is taken too). Event Grid
    schema or CloudEvents 1.0; a one-element batch array is unwrapped."""
    text = message.decode() if isinstance(message, bytes) else message
    candidates = [text]
    try:
        candidates.insert(0, base64.b64decode(text, validate=True).decode("utf-8"))
    except (binascii.Error, ValueError):
        pass
    for candidate in candidates:
        try:
            event = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(event, list) and len(event) == 1:
            event = event[0]
        if isinstance(event, dict) and ("eventType" in event or "type" in event) and isinstance(event.get("data"), dict):
            return event
    raise NotAnEvent(f"not an Event Grid event (base64 JSON with eventType and data): {text[:120]!r}")


def blob_landing_event(event: dict, scheme: str, container: str, prefix: str, account: str = "") -> dict | None:
    """The ingestion event {uri, bucket, key, size, etag, fingerprint, url} of one storage event, or None when it is
    about something else: another event type (deleted, tier changed), another account, container or prefix,
    a hidden object (``storage.is_hidden``: the polling fallback skips those too), or the empty file that a
    Data Lake ``CreateFile`` makes before its ``FlushWithClose`` (which sends the event with the content).

    ``key`` is relative to ``prefix`` and ``fingerprint`` (size:ETag) is what the polling fallback gives the
    same blob version, so the two never announce it twice."""
    kind = event.get("eventType") or event.get("type")
    data = event["data"]
    if kind != BLOB_CREATED:
        return None
    topic = event.get("topic") or event.get("source") or ""
    if account and topic and not topic.rstrip("/").endswith(f"/storageAccounts/{account}"):
        return None
    match = _SUBJECT.match(event.get("subject") or "")
    if not match:
        raise NotAnEvent(f"BlobCreated event {event.get('id')} has no blob subject: {event.get('subject')!r}")
    name = match["name"]
    if match["container"] != container or not name.startswith(prefix) or name.endswith("/"):
        return None
    key = name[len(prefix):]
    if is_hidden(key) or data.get("api") == "CreateFile":
        return None
    if "eTag" not in data or "contentLength" not in data:
        raise NotAnEvent(f"BlobCreated event {event.get('id')} lacks data.eTag or data.contentLength")
    size, etag = int(data["contentLength"]), str(data["eTag"]).strip('"')
    return {"uri": f"{scheme}://{container}/{name}", "bucket": container, "key": key, "size": size, "etag": etag,
            "fingerprint": f"{size}:{etag}", "url": data.get("url", "")}
