"""The agent process: outbox + publisher + model slot + status, around the pure pipeline.

The same :class:`Agent` serves ``edge-agent replay`` (recorded logs, many devices, exits when every
result is acknowledged) and ``edge-agent run`` (a live source until SIGTERM). Here: its wiring (state dir,
outbox, link, publisher, learner), the paho thread's callbacks, start and close, and its status; the model
to run and its hot swap are its :class:`~edge_agent.device.model_slot.ModelSlot`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import contract as c
from edge_agent.device.bundle import BundleRejected, load_public_key
from edge_agent.device.errors import BadSetting, Interrupted, StateConflict, session_start
from edge_agent.device.model_slot import LatestUpdates, ModelSlot, ModelState
from edge_agent.device.outbox import Outbox
from edge_agent.device.pipeline import Processor
from edge_agent.device.publisher import Publisher
from edge_agent.device.state_lock import StateLock
from edge_agent.drift import DeviceDrift
from edge_agent.mqtt import Message, MqttError, MqttLink, Will
from edge_agent.settings.agent import AgentSettings

if TYPE_CHECKING:
    from edge_agent.device.learner import Learner
    from edge_agent.device.metrics import AgentMetrics

log = logging.getLogger(__name__)
_OFFLINE_NOTE_S = 60.0  # how often a disconnected agent says why
_DISK_NOTE_S = 60.0  # how often an agent whose disk is full says what it cannot keep (the first at once)


class Agent(ModelSlot):
    """One MQTT connection, one outbox, one model, any number of device ids (replay)."""

    def __init__(self, settings: AgentSettings, *, device_ids: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.topics = settings.topics
        state = settings.state_path
        state.mkdir(parents=True, exist_ok=True)
        self.state_dir = state
        self._state_lock = StateLock(state)  # before the outbox: a second agent on the folder stops here
        try:
            self._setup(settings, state, device_ids)
        except BaseException:  # the folder is free again for the next Agent of this process
            self._state_lock.release()
            raise

    def _setup(self, settings: AgentSettings, state: Path, device_ids: tuple[str, ...]) -> None:
        self.active_path = state / f"model-{settings.model_name}.emlb"
        self.outbox = self._open_outbox(state)
        self.device_ids: list[str] = list(device_ids)
        single = device_ids[0] if len(device_ids) == 1 else None
        will = self._will(single)
        client_id = settings.client_id or (f"edge-agent-{single}" if single else f"edge-agent-{uuid.uuid4().hex[:8]}")
        try:
            self._trusted = load_public_key(settings.trusted_key) if settings.trusted_key else None
        except BundleRejected as exc:
            raise BadSetting(str(exc)) from None
        # (from the device's own model topic?, payload): a canary bundle there wins over the fleet's
        self._updates = LatestUpdates()
        self._model_topic = self.topics.model(settings.model_name)
        self._device_model_topic = self.topics.device_model(single) if single else None
        self._fleet_bundle: bytes | None = None  # the last bundle of the model topic
        self._canary_bundle: bytes | None = None  # the device's own, while a canary rollout includes it
        self._rounds_topic = self.topics.rounds(settings.model_name)
        self._step_topic = self.topics.round_step(single) if single else None  # secure rounds' steps for it
        self._answered_topic = self.topics.answered(single) if single else None  # the hub's receipts of its answers
        self.learner: Learner | None = None
        subscriptions = self._subscriptions(single)
        # One device, one client id: the broker keeps its session across reconnects (subscriptions, and what
        # was published for it meanwhile), so a reconnect does not download the retained model again. A
        # replay of many devices has a random id: its session would only pile up receipts.
        keep = single is not None and settings.session_expiry_s > 0
        self.link = MqttLink(
            settings.broker_url, client_id, tls=settings.tls, will=will,
            clean_start=session_start(state, client_id, settings.broker_url, subscriptions) if keep else True,
            session_expiry_s=settings.session_expiry_s if keep else None, retained_once=keep,
            keepalive_s=settings.keepalive_s, max_inflight=max(settings.max_inflight, 1), on_message=self._on_message,
            on_published=self._on_published, on_connected=self._on_connected,
            subscriptions=subscriptions,
        )
        self.publisher = Publisher(
            self.outbox, self.link, self.topics, batch_max_results=settings.batch_max_results,
            batch_max_delay_s=settings.batch_max_delay_s, max_inflight=settings.max_inflight,
            receipts=settings.receipts,
        )
        self.model: ModelState | None = None
        if settings.federated and single is not None:
            self.learner = self._new_learner(single, state)
        self.drift: DeviceDrift | None = None  # one meter per device id
        self.metrics: AgentMetrics | None = None
        self.processor: Processor | None = None
        self.source_channels: tuple[str, ...] | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self.stop_event = threading.Event()  # set by SIGTERM/SIGINT (jobs.py): ends waits early
        self._status_due = 0.0
        self._offline_note = 0.0
        self._disk_note = 0.0
        self._disk_said = False  # the disk was said to be full (and not yet that space came back)
        self._status_lock = threading.Lock()
        self.outbox.on_wait = self._waiting_for_room

    def _open_outbox(self, state: Path) -> Outbox:
        """The state dir's outbox, refused when its results were made for another broker or prefix: they
        must not be delivered to this one."""
        settings = self.settings
        outbox = Outbox(state / "outbox.sqlite", max_rows=settings.outbox_max,
                        overflow=settings.outbox_overflow, resend_after_s=settings.resend_after_s,
                        resend_max_s=settings.resend_max_s)
        held = outbox.bind(settings.delivery_target)
        if held is not None:
            outbox.close()
            raise StateConflict(
                f"state dir {state} holds {outbox.depth} results made for {held}; they must not go to "
                f"{settings.delivery_target}: deliver them first (run again with that broker and prefix) or "
                "use another --state-dir")
        return outbox

    def _will(self, single: str | None) -> Will | None:
        """Only a single device has a status the broker can declare offline for it; a replay of many
        says offline for each in :meth:`close`."""
        if single is None:
            return None
        return Will(self.topics.status(single), c.Status(single, c.OFFLINE, time.time()).encode(),
                    c.STATUS_DELIVERY)

    def _subscriptions(self, single: str | None) -> list[tuple[str, int]]:
        subscriptions = [(self._model_topic, 1)]
        if self._device_model_topic:
            subscriptions.append((self._device_model_topic, 1))
        if self.settings.federated and single is not None:
            subscriptions.append((self._rounds_topic, 1))
            subscriptions.append((self.topics.round_step(single), 1))
            subscriptions.append((self.topics.answered(single), 1))
        if self.settings.receipts:
            # A replay of many devices reads every device's receipts (the broker's ACL narrows a real
            # device to its own); subscribing per device as they appear would race their first results.
            subscriptions.append((self.topics.receipts(single) if single else self.topics.all_receipts, 1))
        return subscriptions

    def _new_learner(self, single: str, state: Path) -> Learner:
        """Federated rounds answer for one device only: its windows, its update topic."""
        # Imported here: an agent that takes no part in rounds (federated = false, a replay of several
        # devices) does not carry the learner, threadpoolctl, zipfile: 0.6 MB of anonymous memory (#27 §4).
        from edge_agent.device.learner import Learner

        settings = self.settings
        return Learner(
            device_id=single, state_dir=state, model_name=settings.model_name, capacity=settings.learn_windows,
            trusted_key=self._trusted, allow_unsigned=settings.insecure_allow_unsigned,
            running=lambda: self.model.bundle if self.model is not None else None,
            publish=self._publish_update,
            topic=self.topics.update(single), secure_audit=settings.secure_audit)

    # ----------------------------------------------------------------- paho thread callbacks

    def _on_message(self, msg: Message) -> None:
        if msg.topic == self._model_topic:
            if msg.payload:
                self._updates.put((False, msg.payload))
        elif msg.topic == self._device_model_topic:
            self._updates.put((True, msg.payload))  # empty: the canary is over
        elif msg.topic == self._rounds_topic:  # the exact topics first: a model may be named "receipts"
            if self.learner is not None:
                self.learner.offer(msg.payload)
        elif msg.topic == self._step_topic:
            if self.learner is not None:
                self.learner.offer_step(msg.payload)
        elif msg.topic == self._answered_topic:
            if self.learner is not None:
                self.learner.on_answered(msg.payload)
        elif msg.topic.endswith("/receipts"):
            self.publisher.on_receipt(msg.topic, msg.payload)

    def _publish_update(self, topic: str, payload: bytes, expiry_s: float | None = None) -> None:
        from edge_agent.contract.round_updates import UPDATE_DELIVERY  # loaded with the learner already

        self.link.publish(topic, payload, UPDATE_DELIVERY, expiry_s)

    def _on_published(self, mid: int, ok: bool, reason: str) -> None:
        self.publisher.on_published(mid, ok, reason)

    def _on_connected(self, up: bool) -> None:
        if up:
            self._status_due = 0.0  # re-announce online (the will may have been published)
            self.publisher.on_reconnect()
            if self._device_model_topic and self.link.connects > 1 and not self.link.session_present:
                # The broker lost the session (expired, a crash, clean sessions): a canary rolled back meanwhile
                # left no message. Forget it; the retained bundle of a canary still running comes right after.
                self._updates.put((True, b""))

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        try:
            if self.settings.metrics_port is not None and self.metrics is None:
                from edge_agent.device.metrics import AgentMetrics

                self.metrics = AgentMetrics(self)
                self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            self.link.start()
            self.publisher.start()
        except BaseException:  # e.g. the metrics port taken: nothing started is left holding the folder
            self.link.stop()
            self.outbox.close()
            self._state_lock.release()
            raise

    def close(self, *, drain_timeout: float | None = 10.0) -> bool:
        """Drain the outbox (bounded), publish offline, disconnect. Returns True if fully drained."""
        drained = self.publisher.wait_drained(drain_timeout)
        self.publisher.stop()
        if self.learner is not None:  # a round's answer in the making goes out before the link closes
            self.learner.close()
        self.link.stop(final=[(self.topics.status(d), self._status(d, c.OFFLINE).encode(), c.STATUS_DELIVERY)
                              for d in self.device_ids if c.valid_id(d)])
        if self._disk_said:  # the last word on it, whatever the minute
            self._disk_note = 0.0
            self.note_disk()
        self.outbox.close()
        self._state_lock.release()
        if self.metrics is not None:
            self.metrics.stop()
        return drained

    # ----------------------------------------------------------------- status

    def _status(self, device_id: str, state: str) -> c.Status:
        m = self.model.bundle.manifest if self.model else None
        error = self.last_error or self.publisher.last_error
        if self.outbox.dropped:
            error = f"{error}; " if error else ""
            error += f"outbox overflow dropped {self.outbox.dropped} results"
        if self.outbox.full is not None or self.outbox.unstored:
            error = f"{error}; " if error else ""
            error += (f"disk full in {self.state_dir}" if self.outbox.full is not None else
                      f"the disk was full in {self.state_dir}") + f": {self.outbox.unstored} results not kept"
        return c.Status(device_id, state, time.time(), model_name=m.name if m else None,
                        model_version=m.version if m else None, model_sha256=m.sha256 if m else None,
                        outbox_depth=self.outbox.depth_of(device_id) if len(self.device_ids) > 1 else self.outbox.depth,
                        last_error=error[:2000] if error else None,
                        drift_psi=None if self.drift is None else self.drift.psi(device_id),
                        mean_confidence=None if self.drift is None else self.drift.mean_confidence(device_id))

    def publish_status(self, state: str = c.ONLINE) -> None:
        with self._status_lock:
            for device in self.device_ids:
                try:
                    self.link.publish(self.topics.status(device), self._status(device, state).encode(),
                                      c.STATUS_DELIVERY)
                except (MqttError, c.ContractError) as exc:
                    log.warning("status publish failed: %s", exc)
            self._status_due = time.monotonic() + self.settings.status_interval_s

    def tick(self) -> None:
        """Housekeeping between chunks: model updates, federated rounds, new devices, periodic status. Stops (an
        :class:`MqttError`, exit 3) once the broker refused this run's results for good: the access rules do not
        change by waiting, and every result after would only fill the outbox."""
        refusals = self.publisher.refusals
        if refusals:  # another device's (results an earlier device_id left in the outbox): kept, said, not a stop
            for device in self.device_ids:
                if device in refusals:
                    raise MqttError(refusals[device])
        self.poll_updates()
        if self.learner is not None:
            self.learner.tick()
        if self.processor is not None:
            new = sorted(self.processor.stats.devices - set(self.device_ids))
            if new:
                self.device_ids.extend(new)
                self._status_due = 0.0
        now = time.monotonic()
        if now >= self._status_due and self.link.connected:
            self.publish_status(c.ONLINE)
        away = self.link.disconnected_since
        if away is not None and now - away > min(3.0, self.settings.connect_timeout_s) and now >= self._offline_note:
            # A device keeps working offline (the outbox holds its results), but never silently.
            self._offline_note = now + _OFFLINE_NOTE_S
            log.warning("not connected to %s for %.0f s: %s; %d results kept in the outbox", self.settings.broker_url,
                        now - away, self.link.unreachable_reason(), self.outbox.depth)
        self.outbox.check_space()
        self.note_disk()
        self.publisher.notify()

    def note_disk(self) -> None:
        """Say once a minute (the first time at once) that the state dir's disk is full and what the outbox
        could not keep, and once that space came back; the status says it too."""
        ob = self.outbox
        if ob.full is None:
            if self._disk_said:
                log.warning("disk space again in %s: %d results could not be kept while it was full "
                            "(%d dropped to make room in all, outbox_overflow=%s); %d kept in the outbox",
                            self.state_dir, ob.unstored, ob.dropped, ob.overflow, ob.depth)
                self._disk_said = False
                self._status_due = 0.0
            return
        now = time.monotonic()
        if now < self._disk_note:
            return
        self._disk_note = now + _DISK_NOTE_S
        self._disk_said = True
        self._status_due = 0.0
        log.error("disk full in %s (%s): %d results could not be kept, %d dropped to make room in all "
                  "(outbox_overflow=%s); %d kept in the outbox; still inferring", self.state_dir, ob.full,
                  ob.unstored, ob.dropped, ob.overflow, ob.depth)

    def _waiting_for_room(self) -> None:
        """The outbox waits for room on a full disk (``block``): say so, publish the status, and give up
        on SIGTERM/SIGINT (what is kept is safe; the results of the batch in hand are not kept)."""
        self.note_disk()
        if time.monotonic() >= self._status_due and self.link.connected:
            self.publish_status(c.ONLINE)
        if self.stop_event.is_set():
            raise Interrupted(f"interrupted while the disk of {self.state_dir} is full: {self.outbox.depth} "
                              "results kept in the outbox, sent on the next start")
