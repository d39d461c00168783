"""The `gcp` backend's bucket events: GCS Pub/Sub notifications (``OBJECT_FINALIZE``) turned into ingestion
events. Pure functions: the trigger that pulls the subscription is in ``mlfactory_airflow.backends.gcp.triggers``."""

from __future__ import annotations

import json

from mlfactory.storage import is_hidden


class NotANotification(ValueError):
    """A Pub/Sub message that is not a GCS notification."""


def gcs_landing_event(attributes: dict[str, str], data: bytes, bucket: str, prefix: str) -> dict | None:
    """The ingestion event {uri, bucket, key, size, generation, md5, crc32c, etag} of one notification, or
    None when it is about something else: another event type (delete, metadata update, archive), another
    bucket, a key outside ``prefix``, a folder placeholder or a hidden object (the polling fallback skips
    those too: ``storage.is_hidden``). ``etag`` is the fingerprint the polling
    fallback gives the same object generation (size:generation), so the two never announce it twice.
    The object JSON is in the data with payload format JSON_API_V1 (the default); with NONE the size is unknown (-1)."""
    if "eventType" not in attributes or "objectId" not in attributes or "bucketId" not in attributes:
        raise NotANotification(f"no eventType/bucketId/objectId attributes (got {sorted(attributes)[:10]})")
    if attributes["eventType"] != "OBJECT_FINALIZE":
        return None
    name, key = attributes["bucketId"], attributes["objectId"]
    if name != bucket or not key.startswith(prefix) or key.endswith("/") or is_hidden(key[len(prefix):]):
        return None  # (hidden: dot-files and _-folders, e.g. an upload's temporary object)
    obj: dict = {}
    if attributes.get("payloadFormat", "JSON_API_V1") == "JSON_API_V1" and data:
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NotANotification(f"payload of {key} is not the object's JSON: {err}") from None
    generation = str(attributes.get("objectGeneration") or obj.get("generation") or "")
    size = int(obj["size"]) if "size" in obj else -1
    return {"uri": f"gs://{name}/{key}", "bucket": name, "key": key, "size": size, "generation": generation,
            "md5": obj.get("md5Hash", ""), "crc32c": obj.get("crc32c", ""), "etag": f"{size}:{generation}"}
