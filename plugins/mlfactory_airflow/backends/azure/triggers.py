"""The `azure` backend's triggers.

Bucket events (AssetWatcher event triggers):

- ``BlobQueueEventTrigger``: ``Microsoft.Storage.BlobCreated`` events delivered by an Event Grid
  subscription to a Storage Queue. Set up once per storage account (docs/backends/azure.md, "Setting it up").
- The fallback for a bucket without a queue lists the prefix: ``StoragePrefixPollTrigger`` over the storage
  layer (adlfs), which gives each blob the same fingerprint (size:ETag), so switching between the two
  announces nothing twice.

Deferred work (plain triggers: the task holds no worker slot while Azure ML works):

- ``AzureMLJobTrigger``: a command job or a batch endpoint's job until it ends (cancelled when a user
  kills the deferred task).
- ``AzureMLResourceTrigger``: an online or batch endpoint or deployment until its provisioning ends (or,
  after a delete, until it is gone).
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


class BlobQueueEventTrigger(WatermarkedTrigger):
    """One event per blob version (ETag) created under ``scheme://container/prefix``, from the Storage Queue
    that Event Grid delivers the account's ``BlobCreated`` events to: {uri, bucket, key, size, etag,
    fingerprint, url}.

    A message is deleted only after its event has been emitted (and the watermark saved), so a triggerer
    that dies in between sees it again when its visibility timeout ends; an event for a blob version already
    announced is deleted and dropped, while a new ETag of the same name (an overwrite) is announced. Other
    event types, accounts, containers and prefixes are deleted and dropped. A message that is not an
    Event Grid event is left in the queue; after ``max_dequeue_count`` deliveries it is moved to
    ``<queue>-poison`` (the Azure Functions convention), never deleted unseen."""

    def __init__(self, queue: str, storage_conn_id: str, account: str, scheme: str, container: str, prefix: str,
                 ledger_uri: str | None = None, visibility_timeout: int = 300, max_dequeue_count: int = 5,
                 poll_interval: float = 2.0) -> None:
        super().__init__()
        self.queue, self.storage_conn_id, self.account = queue, storage_conn_id, account
        self.scheme, self.container, self.prefix, self.ledger_uri = scheme, container, prefix, ledger_uri
        self.visibility_timeout, self.max_dequeue_count, self.poll_interval = (visibility_timeout, max_dequeue_count,
                                                                                poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return _path(self), {"queue": self.queue, "storage_conn_id": self.storage_conn_id, "account": self.account,
                             "scheme": self.scheme, "container": self.container, "prefix": self.prefix,
                             "ledger_uri": self.ledger_uri, "visibility_timeout": self.visibility_timeout,
                             "max_dequeue_count": self.max_dequeue_count, "poll_interval": self.poll_interval}

    def _receive(self, client) -> list:
        pages = client.receive_messages(messages_per_page=32, visibility_timeout=self.visibility_timeout).by_page()
        return list(next(pages, []))

    def _to_poison(self, client, message) -> None:
        from azure.core.exceptions import ResourceExistsError

        from mlfactory_airflow.backends.azure.hooks import queue_client

        poison = queue_client(self.storage_conn_id, self.account, f"{self.queue}-poison")
        try:
            poison.create_queue()
        except ResourceExistsError:
            pass
        poison.send_message(message.content)
        client.delete_message(message)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from mlfactory.backends.azure.events import NotAnEvent, blob_landing_event, decode

        from mlfactory_airflow.backends.azure.hooks import queue_client

        landing = f"{self.scheme}://{self.container}/{self.prefix}"
        async for event in self.waiting_at_start(landing, 0):
            yield event
        watermark = await self.load_watermark()
        client = queue_client(self.storage_conn_id, self.account, self.queue)
        self.log.info("reading BlobCreated events for %s from queue %s (%d objects already announced)", landing,
                      self.queue, len(watermark.seen))
        while True:
            messages = await asyncio.to_thread(self._receive, client)
            for message in messages:
                try:
                    event = blob_landing_event(decode(message.content), self.scheme, self.container, self.prefix,
                                               self.account)
                except NotAnEvent as err:
                    if message.dequeue_count >= self.max_dequeue_count:
                        self.log.error("message %s on %s is not a storage event (%s), delivered %d times: moved to "
                                       "%s-poison", message.id, self.queue, err, message.dequeue_count, self.queue)
                        await asyncio.to_thread(self._to_poison, client, message)
                    else:
                        self.log.error("message %s on %s is not a storage event (%s); left in the queue (delivery "
                                       "%d of %d before %s-poison)", message.id, self.queue, err, message.dequeue_count,
                                       self.max_dequeue_count, self.queue)
                    continue
                if event and watermark.announced(event["key"], event["fingerprint"]):
                    self.log.info("already announced: %s (ETag %s)", event["uri"], event["etag"])
                elif event:
                    self.log.info("new blob %s (ETag %s, %d bytes)", event["uri"], event["etag"], event["size"])
                    yield TriggerEvent(event)
                    watermark.remember(event["key"], event["fingerprint"])
                    await self.save_watermark(watermark)
                await asyncio.to_thread(client.delete_message, message)
            if not messages:
                await asyncio.sleep(self.poll_interval)


class _AzureMLPoll(PollingTrigger):
    """Polls one Azure ML resource (``connection``: an ``AzureMLHook``'s ``to_dict()``)."""

    def _client(self):
        from mlfactory_airflow.backends.azure.hooks import AzureMLHook

        return AzureMLHook(**self.connection).get_conn()


class AzureMLJobTrigger(_AzureMLPoll):
    """An Azure ML job until it ends: {"name", "state" (succeeded/failed/stopped), "detail"}. Killing the
    deferred task cancels the job."""

    def check(self) -> dict | None:
        from mlfactory.backends.azure.azureml import job_status

        status = job_status(self._client().jobs.get(self.name))
        if status.state == "running":
            self.log.info("%s: %s", self.name, status.detail)
            return None
        return {"state": status.state, "detail": status.detail}

    async def on_kill(self) -> None:
        await asyncio.to_thread(cancel_job, self._client(), self.name, self.log)


KINDS = ("online_endpoints", "online_deployments", "batch_endpoints", "batch_deployments")


class AzureMLResourceTrigger(_AzureMLPoll):
    """An endpoint or deployment (``kind`` one of KINDS, ``endpoint`` for a deployment) until its provisioning
    ends: {"state": "succeeded" | "failed" | "deleted", "detail"} ("deleted" once a deleted one is gone)."""

    def check(self) -> dict | None:
        from mlfactory_airflow.backends.azure.hooks import not_found

        kind, endpoint = self.extra["kind"], self.extra.get("endpoint")
        operations = getattr(self._client(), kind)
        resource = not_found(operations.get, self.name, endpoint) if endpoint else not_found(operations.get, self.name)
        if resource is None:
            return {"state": "deleted", "detail": "gone"}
        state = (resource.provisioning_state or "").lower()
        if state == "succeeded":
            return {"state": "succeeded", "detail": "provisioned"}
        if state in ("failed", "canceled"):
            return {"state": "failed", "detail": f"provisioning {state}"}
        self.log.info("%s %s: provisioning %s", kind, self.name, state or "pending")
        return None


DONE = ("succeeded", "deleted")


def resource_trigger(hook, kind: str, name: str, poll_interval: int, endpoint: str | None = None,
                     timeout_s: int = 3600):
    """An ``AzureMLResourceTrigger`` on the ``kind`` resource ``name`` (of ``endpoint``, for a deployment)."""
    from mlfactory_airflow.backends.azure.triggers import AzureMLResourceTrigger

    extra = {"kind": kind, **({"endpoint": endpoint} if endpoint else {})}
    return AzureMLResourceTrigger(name, hook.to_dict(), poll_interval=poll_interval, timeout_s=timeout_s, **extra)


def cancel_job(client, name: str, log) -> None:
    """Best effort: a job that has ended already (or a call that fails) is logged, never raised."""
    try:
        client.jobs.begin_cancel(name)
        log.info("cancelled Azure ML job %s", name)
    except Exception as err:  # noqa: BLE001 - killing must not fail on a finished job
        log.warning("could not cancel Azure ML job %s: %s", name, err)

