"""The `gcp` backend's triggers.

Bucket events (AssetWatcher event triggers, on the google provider's hooks):

- ``GcsNotificationTrigger``: GCS -> Pub/Sub notifications (``OBJECT_FINALIZE``) pulled from a
  subscription (``PubSubAsyncHook``). Set up once per bucket (docs/backends/gcp.md, "Setting it up").
- ``GcsPrefixPollTrigger``: the fallback for a bucket without notifications, listing the prefix (``GCSHook``).

Both announce each object generation once, with the same fingerprint (size:generation) kept in the
Asset's state store, so switching between them announces nothing twice.

Deferred work (plain triggers: the task holds no worker slot while Vertex works):

- ``VertexJobTrigger``: a CustomJob or BatchPredictionJob until it ends (the training job's is cancelled
  when a user kills the deferred task).
- ``VertexOperationTrigger``: a long-running operation (model upload, endpoint creation, deploy, undeploy)
  until it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from mlfactory_airflow.triggers.polling import PollingTrigger
from mlfactory_airflow.triggers.watermark import WatermarkedTrigger


def _path(trigger) -> str:
    return f"{type(trigger).__module__}.{type(trigger).__qualname__}"


class GcsNotificationTrigger(WatermarkedTrigger):
    """One event per object generation created under ``gs://bucket/prefix``, from the bucket's Pub/Sub
    notifications: {uri, bucket, key, size, generation, md5, crc32c, etag}.

    A message is acknowledged only after its event has been emitted (and the watermark saved), so a
    triggerer that dies in between gets it again (Pub/Sub delivers at least once); a redelivered or
    duplicated notification of a generation already announced is acknowledged and dropped, while a new
    generation of the same name (an overwrite) is announced; an acknowledgement refused by a Pub/Sub hiccup
    does not stop the watcher (the messages come again and are dropped then). Deletions, metadata updates, other buckets
    and other prefixes are acknowledged and dropped. A message that is not a GCS notification is logged
    and left unacknowledged: the subscription's dead-letter policy takes it after its retries."""

    def __init__(self, subscription: str, project_id: str, bucket: str, prefix: str,
                 gcp_conn_id: str = "google_cloud_default", max_messages: int = 100,
                 ledger_uri: str | None = None) -> None:
        super().__init__()
        self.subscription, self.project_id, self.bucket, self.prefix = subscription, project_id, bucket, prefix
        self.gcp_conn_id, self.max_messages, self.ledger_uri = gcp_conn_id, max_messages, ledger_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return _path(self), {"subscription": self.subscription, "project_id": self.project_id, "bucket": self.bucket,
                             "prefix": self.prefix, "gcp_conn_id": self.gcp_conn_id, "max_messages": self.max_messages,
                             "ledger_uri": self.ledger_uri}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.google.cloud.hooks.pubsub import PubSubAsyncHook, PubSubException
        from mlfactory.backends.gcp.events import NotANotification, gcs_landing_event

        async for event in self.waiting_at_start(f"gs://{self.bucket}/{self.prefix}", 0):
            yield event
        watermark = await self.load_watermark()
        hook = PubSubAsyncHook(gcp_conn_id=self.gcp_conn_id, project_id=self.project_id)
        self.log.info("reading GCS notifications for gs://%s/%s from subscription %s (%d objects already announced)",
                      self.bucket, self.prefix, self.subscription, len(watermark.seen))
        while True:
            try:
                received = await hook.pull(subscription=self.subscription, project_id=self.project_id,
                                           max_messages=self.max_messages, return_immediately=False, timeout=60)
            except PubSubException as err:
                if not _transient(err):
                    raise
                self.log.info("pull from %s: %s; pulling again", self.subscription, err.args[-1])
                await asyncio.sleep(1)
                continue
            done = []
            for item in received:
                attributes = dict(item.message.attributes)
                try:
                    event = gcs_landing_event(attributes, item.message.data, self.bucket, self.prefix)
                except NotANotification as err:
                    self.log.error("message %s on %s is not a GCS notification (%s); left unacknowledged for the "
                                   "subscription's dead-letter policy", item.message.message_id, self.subscription, err)
                    continue
                if event and watermark.announced(event["key"], event["etag"]):
                    self.log.info("already announced: %s (generation %s)", event["uri"], event["generation"])
                elif event:
                    self.log.info("new object %s (generation %s, %d bytes)", event["uri"], event["generation"],
                                  event["size"])
                    yield TriggerEvent(event)
                    watermark.remember(event["key"], event["etag"])
                    await self.save_watermark(watermark)
                done.append(item.ack_id)
            if done:
                try:
                    await hook.acknowledge(subscription=self.subscription, project_id=self.project_id, ack_ids=done)
                except PubSubException as err:
                    if not _transient(err):
                        raise
                    # not lost: Pub/Sub delivers them again after the ack deadline, and they are dropped as announced
                    self.log.warning("acknowledging %d message(s) on %s: %s; they come again and are acknowledged then",
                                     len(done), self.subscription, err.args[-1])


def _transient(err: Exception) -> bool:
    """A pull that timed out with nothing to read, or a Pub/Sub hiccup: go on (anything else is raised)."""
    from google.api_core.exceptions import DeadlineExceeded, InternalServerError, ServiceUnavailable

    cause = err.args[-1] if err.args else None
    return isinstance(cause, (DeadlineExceeded, ServiceUnavailable, InternalServerError))


class GcsPrefixPollTrigger(WatermarkedTrigger):
    """The fallback for a bucket without notifications: lists ``gs://bucket/prefix`` every ``poll_interval``
    seconds (one LIST per 1000 objects; prefer notifications for busy buckets) and emits the same events
    as ``GcsNotificationTrigger`` for each object generation not announced yet, once it has been unchanged
    for ``settle_seconds``."""

    def __init__(self, bucket: str, prefix: str, gcp_conn_id: str = "google_cloud_default", poll_interval: float = 60.0,
                 settle_seconds: float = 5.0, ledger_uri: str | None = None) -> None:
        super().__init__()
        self.bucket, self.prefix, self.gcp_conn_id = bucket, prefix, gcp_conn_id
        self.poll_interval, self.settle_seconds, self.ledger_uri = poll_interval, settle_seconds, ledger_uri

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return _path(self), {"bucket": self.bucket, "prefix": self.prefix, "gcp_conn_id": self.gcp_conn_id,
                             "poll_interval": self.poll_interval, "settle_seconds": self.settle_seconds,
                             "ledger_uri": self.ledger_uri}

    def _listing(self, client) -> list:
        from mlfactory.storage import ObjectInfo, is_hidden

        found = []
        for blob in client.list_blobs(self.bucket, prefix=self.prefix):
            if blob.name.endswith("/") or is_hidden(blob.name[len(self.prefix):]):
                continue
            found.append(ObjectInfo(f"gs://{self.bucket}/{blob.name}", blob.name, int(blob.size or 0),
                                    f"{int(blob.size or 0)}:{blob.generation}", blob.updated.timestamp()))
        return found

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        client = GCSHook(gcp_conn_id=self.gcp_conn_id).get_conn()
        self.log.info("listing gs://%s/%s (no Pub/Sub subscription configured)", self.bucket, self.prefix)
        async for event in self.waiting_at_start(f"gs://{self.bucket}/{self.prefix}", self.settle_seconds):
            yield event
        async for event in self.poll(lambda: self._listing(client),
                                     lambda obj: {"uri": obj.uri, "bucket": self.bucket, "key": obj.key, "size": obj.size,
                                                  "generation": obj.fingerprint.split(":", 1)[1], "etag": obj.fingerprint},
                                     self.poll_interval, self.settle_seconds):
            yield event


class _VertexPoll(PollingTrigger):
    """Polls one Vertex resource (``connection``: a ``VertexConnection`` as a dict)."""

    def _client(self, service: str):
        from mlfactory_airflow.backends.gcp.hooks import VertexConnection

        return VertexConnection(**self.connection).client(service)


class VertexJobTrigger(_VertexPoll):
    """A CustomJob (``name`` .../customJobs/ID) or BatchPredictionJob (.../batchPredictionJobs/ID) until it ends:
    {"name", "state" (succeeded/failed/stopped), "detail"}. Killing the deferred task cancels the job."""

    def _get(self, client):
        if "/batchPredictionJobs/" in self.name:
            return client.get_batch_prediction_job(name=self.name)
        return client.get_custom_job(name=self.name)

    def check(self) -> dict | None:
        from mlfactory.backends.gcp.vertex import job_status

        status = job_status(self._get(self._client("job")))
        if status.state == "running":
            self.log.info("%s: %s", self.name, status.detail)
            return None
        return {"state": status.state, "detail": status.detail}

    async def on_kill(self) -> None:
        await asyncio.to_thread(cancel_job, self._client("job"), self.name, self.log)


class VertexOperationTrigger(_VertexPoll):
    """A long-running operation (``name`` .../operations/ID) until done: {"name", "state", "detail"};
    ``service`` (endpoint, model, ...) is the client that owns it."""

    def __init__(self, name: str, connection: dict, service: str = "endpoint", **kwargs) -> None:
        super().__init__(name, connection, service=service, **kwargs)

    def check(self) -> dict | None:
        operation = self._client(self.extra["service"]).get_operation(request={"name": self.name})
        if not operation.done:
            return None
        if operation.HasField("error") and operation.error.code:
            return {"state": "failed", "detail": f"{operation.error.message} (code {operation.error.code})"}
        return {"state": "succeeded", "detail": "done"}


def cancel_job(client, name: str, log) -> None:
    """Best effort: a job that has ended already (or a call that fails) is logged, never raised."""
    try:
        if "/batchPredictionJobs/" in name:
            client.cancel_batch_prediction_job(name=name)
        else:
            client.cancel_custom_job(name=name)
        log.info("cancelled Vertex job %s", name)
    except Exception as err:  # noqa: BLE001 - killing must not fail on a finished job
        log.warning("could not cancel Vertex job %s: %s", name, err)
