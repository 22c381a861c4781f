"""The agent's model slot: which model runs, and the switch to the next one.

:class:`ModelSlot` holds the :class:`~edge_agent.device.agent.Agent`'s model methods: the model to start with
(a file named on the command line, the one the state dir kept, else the retained model topic, waited for),
each bundle verified, kept on disk and hot-swapped into the pipeline (a device's canary bundle over the
fleet's), and the pipeline built around it. Apart from :mod:`edge_agent.device.agent` because it changes with
the rules for bundles and swaps, not with the link, the outbox or the status; the agent builds the state these
methods use (``Agent._setup``: the queue the paho thread fills, the trusted key, the paths) and mixes them in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from edge_agent import contract as c
from edge_agent.device.bundle import BundleRejected, persist_bundle, verify_bundle
from edge_agent.device.disk_room import is_disk_full
from edge_agent.device.errors import DATA_FAULT, AgentError, BadSetting, Interrupted, refusal_hint
from edge_agent.device.outbox import Outbox
from edge_agent.device.pipeline import Processor
from edge_agent.drift import DeviceDrift
from edge_agent.mqtt import MqttError, MqttLink
from edge_agent.runner import ModelError, ModelRunner
from edge_agent.settings.agent import AgentSettings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge_agent.device.learner import Learner
    from edge_agent.device.metrics import AgentMetrics

log = logging.getLogger("edge_agent.device.agent")  # the agent's logger: its lines keep the name they had


class LatestUpdates:
    """The model topics' newest payloads not yet taken, one a topic (the device's own, the fleet's): a newer one
    replaces the older, since the newest is what a device installs anyway. A flood of model messages while the
    agent is busy or its source quiet held every one of them (15 messages of 30 MB: 84 -> 612 MB, a hostile
    peer's finding); now it holds one a topic. Put by paho's thread, taken by the agent's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[bool, bytes] = {}  # from the device's own model topic? -> payload
        self._ready = threading.Event()

    def put(self, item: tuple[bool, bytes]) -> None:
        own, payload = item
        with self._lock:
            self._items.pop(own, None)  # the newest goes last: taken in arrival order
            self._items[own] = payload
            self._ready.set()

    def get_nowait(self) -> tuple[bool, bytes]:
        with self._lock:
            if not self._items:
                raise queue.Empty
            own = next(iter(self._items))
            payload = self._items.pop(own)
            if not self._items:
                self._ready.clear()
            return own, payload

    def get(self, timeout: float) -> tuple[bool, bytes]:
        if not self._ready.wait(timeout):
            raise queue.Empty
        return self.get_nowait()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ModelState:
    bundle: c.Bundle
    runner: ModelRunner


class ModelSlot:
    """The :class:`~edge_agent.device.agent.Agent`'s model methods (mixed into it; ``Agent._setup`` sets the
    attributes below)."""

    settings: AgentSettings
    topics: c.Topics
    link: MqttLink
    outbox: Outbox
    active_path: Path  # where the running model is kept for the next start
    stop_event: threading.Event
    # (from the device's own model topic?, payload), put by the paho thread
    _updates: LatestUpdates
    _model_topic: str  # the fleet's model topic
    _device_model_topic: str | None  # the device's own (canary) model topic, when it runs as one device
    _fleet_bundle: bytes | None
    _canary_bundle: bytes | None
    _trusted: Ed25519PublicKey | None
    _status_due: float
    model: ModelState | None
    source_channels: tuple[str, ...] | None
    processor: Processor | None
    drift: DeviceDrift | None
    learner: Learner | None
    metrics: AgentMetrics | None
    last_error: str | None
    swaps: int
    _from_file = False  # the running model is the one --model named (the first, until the topic's replaces it)
    _previous: c.Bundle | None = None  # the model before the running one: what serves again if it fails

    # ----------------------------------------------------------------- models

    def load_model(self, explicit: str | None, channels: tuple[str, ...]) -> ModelState:
        """The model to start with: ``explicit`` file, else the persisted one, else the retained topic."""
        self.source_channels = channels
        candidates: list[tuple[str, bytes]] = []
        if explicit:
            try:
                candidates.append((explicit, Path(explicit).expanduser().read_bytes()))
            except OSError as exc:
                raise BadSetting(f"cannot read model {explicit}: {exc.strerror or exc}") from exc
        elif self.active_path.is_file():
            candidates.append((str(self.active_path), self.active_path.read_bytes()))
        for origin, payload in candidates:
            try:
                # A file the operator names is trusted like a signed bundle when no key is configured; the one kept
                # in the state dir came from this model's topics (or an older build kept another model there).
                self._install(payload, allow_unsigned=self.settings.insecure_allow_unsigned or
                              (origin == explicit and self._trusted is None), from_topic=origin != explicit)
                log.info("model v%d from %s", self.model.bundle.manifest.version, origin)  # type: ignore[union-attr]
                self._from_file = origin == explicit
                return self.model  # type: ignore[return-value]
            except BundleRejected as exc:
                if origin == explicit:
                    data = DATA_FAULT in str(exc)  # then the model is right, and the hint says so
                    raise AgentError(f"model {origin} refused: {exc}" + (f". {refusal_hint(str(exc))}" if data else "")
                                     ) from exc
                log.warning("persisted model %s refused (%s); waiting for the model topic", origin, exc)
        return self._wait_for_model()

    def _wait_for_model(self) -> ModelState:
        """The retained model of the topic. A refused one ends the wait at once (it stays retained: waiting
        for another is waiting for an operator), and so does SIGTERM/SIGINT or an unreachable broker."""
        topic = self._model_topic
        deadline = time.monotonic() + self.settings.model_wait_s
        log.info("waiting up to %g s for a model on %s", self.settings.model_wait_s, topic)
        said = False
        while time.monotonic() < deadline:
            if self.stop_event.is_set():
                raise Interrupted("interrupted while waiting for a model")
            try:
                own, payload = self._updates.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
                self._note(own, payload)
                if not (self._canary_bundle or self._fleet_bundle):
                    continue
            except queue.Empty:
                away = self.link.disconnected_since
                if away is not None and time.monotonic() - away > min(3.0, self.settings.connect_timeout_s) \
                        and not said:
                    said = True
                    log.warning("not connected to %s yet (%s); trying for up to %g s", self.settings.broker_url,
                                self.link.unreachable_reason(), self.settings.connect_timeout_s)
                if away is not None and time.monotonic() - away > self.settings.connect_timeout_s:
                    raise MqttError(f"cannot reach the broker {self.settings.broker_url} for "
                                    f"{self.settings.connect_timeout_s:g} s to get a model from {topic}: "
                                    f"{self.link.unreachable_reason()}") from None
                continue
            refusals = self._install_wanted()
            if self.model is not None:
                return self.model
            where, why = refusals[-1]
            raise AgentError(f"the model on {where} was refused: {why}. {refusal_hint(why)}")
        why = (f"not connected to {self.settings.broker_url}: {self.link.unreachable_reason()}"
               if not self.link.connected else f"connected to {self.settings.broker_url}; nothing is published there")
        raise AgentError(f"no model on {topic} within {self.settings.model_wait_s:g} s ({why}). "
                         "Pass --model FILE or publish one with `cloud-hub publish`.")

    def _install(self, payload: bytes, *, allow_unsigned: bool, from_topic: bool = False) -> None:
        """Verify and swap in a bundle; ``from_topic``: it came on this model's topic or the device's canary
        topic, which carry this model only (a bundle of another model, signed by the same hub, is refused)."""
        bundle, runner = verify_bundle(
            payload, trusted_key=self._trusted, allow_unsigned=allow_unsigned,
            channels=self.source_channels, intra_op_threads=self.settings.intra_op_threads,
        )
        if from_topic and bundle.manifest.name != self.settings.model_name:
            raise BundleRejected(f"the bundle is model {bundle.manifest.name!r} v{bundle.manifest.version}, and this "
                                 f"device runs {self.settings.model_name!r} (model_name): not installed")
        if self.model is not None and bundle.manifest.sha256 == self.model.bundle.manifest.sha256:
            return  # the retained copy of what already runs
        refused = self._refused().get(bundle.manifest.sha256)
        if refused is not None:
            raise BundleRejected(f"model v{bundle.manifest.version} was refused on this device: {refused} (delete "
                                 f"{self._refused_path()} to try it again)")
        if self.model is not None and bundle.manifest.version < self.model.bundle.manifest.version:
            log.warning("the model topic holds %s v%d, older than the v%d running: switching to it (the topic "
                        "decides, as in a rollback%s)", bundle.manifest.name, bundle.manifest.version,
                        self.model.bundle.manifest.version,  # --model named where no --model was given (an operator)
                        "; --model only chooses the model to start with" if self._from_file else "")
        self._from_file = False
        saved = self._persist(bundle)
        self._previous = self.model.bundle if self.model is not None else None
        self.model = ModelState(bundle, runner)
        self.drift = DeviceDrift.of(bundle.manifest.training)  # counts start again with each model
        if self.processor is not None:
            self.processor.swap(runner)
            self.processor.drift = self.drift
            self.swaps += 1
        self.last_error = saved
        self._status_due = 0.0
        log.info("serving model %s v%d (%s)", bundle.manifest.name, bundle.manifest.version, bundle.manifest.sha256[:12])

    def _model_fault(self, exc: ModelError) -> bool:
        """The running model failed on real readings (the :class:`Processor` asks; e.g. NaN on anything but the
        zeros of its warm-up, a hostile peer's finding: the agent stopped, and again at every start on the model it
        had kept). It is refused for good on this device (its sha256 kept beside the kept model, so that neither
        a restart nor the retained topic installs it again) and the model before it serves again: True. False
        when there is none: the agent stops, saying why, and keeps no model for its next start."""
        assert self.model is not None and self.processor is not None
        m = self.model.bundle.manifest
        why = f"it failed on this device's readings ({exc})"
        self._refuse(m.sha256, why)
        self.last_error = f"model v{m.version} refused: {why}"
        self._status_due = 0.0
        previous, self._previous = self._previous, None
        if previous is None:
            with contextlib.suppress(OSError):
                self.active_path.unlink(missing_ok=True)
            log.error("model %s v%d refused: %s; no model to go back to", m.name, m.version, why)
            return False
        runner = ModelRunner(previous, intra_op_threads=self.settings.intra_op_threads)
        self.last_error = self._persist(previous) or self.last_error
        self.model = ModelState(previous, runner)
        self.drift = DeviceDrift.of(previous.manifest.training)
        self.processor.swap(runner)
        self.processor.drift = self.drift
        self.swaps += 1
        log.error("model %s v%d refused: %s; serving v%d again", m.name, m.version, why, previous.manifest.version)
        return True

    def _refused_path(self) -> Path:
        return self.active_path.with_name(self.active_path.name + ".refused.json")

    def _refused(self) -> dict[str, str]:
        """sha256 -> why, of the models this device refused once they ran (empty when it cannot be read)."""
        try:
            got = orjson.loads(self._refused_path().read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return {k: v for k, v in got.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(got, dict) else {}

    def _refuse(self, sha256: str, why: str) -> None:
        refused = self._refused()
        refused[sha256] = why
        path = self._refused_path()
        tmp = path.with_name(path.name + ".tmp")
        try:  # written aside, then renamed: a full disk must not truncate the refusals kept before
            tmp.write_bytes(orjson.dumps(refused))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: this refusal holds for this run only
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("cannot keep the refusal in %s: %s", path, exc)

    def _persist(self, bundle: c.Bundle) -> str | None:
        """Keep the model for the next start; a full disk does not stop it from serving (None: kept)."""
        try:
            persist_bundle(bundle, self.active_path)
            return None
        except OSError as exc:
            tmp = self.active_path.with_suffix(self.active_path.suffix + ".tmp")  # bundle.persist_bundle's
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            why = "the disk is full" if is_disk_full(exc) else str(exc)
            error = (f"cannot save model v{bundle.manifest.version} to {self.active_path} ({why}): serving it "
                     "from memory; the next start takes it from the model topic again")
            log.warning("%s", error)
            return error

    def _note(self, own: bool, payload: bytes) -> None:
        if own:
            self._canary_bundle = payload or None
        else:
            self._fleet_bundle = payload

    def poll_updates(self) -> None:
        """Between batches: verify and hot-swap the model to run (the device's canary bundle while it has
        one, else the model topic's) when it changed; a bad one is refused and the running one stays."""
        changed = False
        while True:
            try:
                own, payload = self._updates.get_nowait()
            except queue.Empty:
                break
            self._note(own, payload)
            changed = True
        if changed:
            self._install_wanted()

    def _install_wanted(self) -> list[tuple[str, str]]:
        """Install the device's canary bundle while it has one, else the model topic's; the topic's too when the
        canary's is refused (a refused canary must not hold back every later fleet model). A refused bundle is
        said in the status and the log, and what runs stays; returns the refusals, (topic, why)."""
        refusals: list[tuple[str, str]] = []
        for topic, payload in ((self._device_model_topic, self._canary_bundle), (self._model_topic, self._fleet_bundle)):
            if not payload:
                continue
            try:
                self._install(payload, allow_unsigned=self.settings.insecure_allow_unsigned, from_topic=True)
            except Exception as exc:  # retained: any failure must refuse it, not crash-loop on it
                why = str(exc) if isinstance(exc, BundleRejected) else f"{type(exc).__name__}: {exc}"
                refusals.append((topic or self._model_topic, why))
                log.error("model on %s refused: %s; %s", topic, why,
                          f"still serving v{self.model.bundle.manifest.version}" if self.model else "no model yet")
                continue
            break
        if refusals:
            self.last_error = f"model refused: {refusals[0][1]}"
            self._status_due = 0.0
        return refusals

    def make_processor(self) -> Processor:
        assert self.model is not None and self.source_channels is not None
        s = self.settings
        self.processor = Processor(self.model.runner, self.outbox, source_channels=self.source_channels,
                                   device_id=s.device_id, features=s.features, features_sample=s.features_sample)
        self.processor.drift = self.drift
        self.processor.on_model_fault = self._model_fault
        if self.learner is not None:
            self.processor.on_labelled = self.learner.on_windows
        if self.metrics is not None:
            self.processor.on_inference = self.metrics.observe_inference
        return self.processor
