"""The device's side of federated rounds: keep labelled windows, answer a round with an INT8 delta.

:class:`WindowStore` keeps the features of the newest labelled windows (the label column of the
source) in the state dir, bounded, so a restart keeps them; they never leave the device.
:class:`Learner` takes the hub's retained round announcement, checks it (signature, the base is the
model this device runs, this device was selected, enough new windows), fine-tunes in a background
thread with :mod:`edge_agent.device.learn` (numpy, one BLAS thread; inference keeps running) and publishes its update:
the INT8-quantized delta of the trainable tensors, its example count, losses and scores before and
after, and the activation ranges it saw. Asked to evaluate the round's candidate, it scores its FP32
weights and the INT8 model the hub would ship (the announcement carries it; run by
:mod:`edge_agent.runner`, as the agent would run it) against the base, on its held-out windows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from threadpoolctl import threadpool_limits

from edge_agent import heap
from edge_agent.contract import Bundle, ContractError
from edge_agent.contract.answers import decode_answer_receipt
from edge_agent.contract.round_updates import UPDATE_DELIVERY, Update, encode_update_delta
from edge_agent.contract.rounds import Announcement, RoundPlan
from edge_agent.device.answers import PendingAnswers
from edge_agent.device.bundle import BundleRejected, check_round
from edge_agent.device.seat import SecureSeat

log = logging.getLogger(__name__)
_SAVE_NOTE_S = 60.0  # a store that cannot be saved (a full disk) is said this often


SAID_AGAIN_S = 60.0  # a round's "not answering yet" with new counts, at most this often


def _shape(text: str | None) -> str | None:
    """A message without its counts: the same verdict with other counts (the round's number kept: a new round's
    verdict is said at once)."""
    return None if text is None else re.sub(r"(?<!round )\b\d+", "#", text)


class Repeats:
    """Whether to log a message again: when its words change (its round too), its counts at most every ``every_s``."""

    def __init__(self, every_s: float = SAID_AGAIN_S) -> None:
        self.every_s, self._at = every_s, -math.inf
        self._shape: str | None = None

    def say(self, text: str, now: float) -> bool:
        shape = _shape(text)
        if shape != self._shape or now - self._at >= self.every_s:
            self._shape, self._at = shape, now
            return True
        return False


class WindowStore:
    """The newest ``capacity`` labelled feature windows of one model's feature layout, on disk."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path, self.capacity = path, capacity
        self.X = np.zeros((0, 0), np.float32)
        self.y: list[str] = []
        self.t = np.zeros(0)  # window starts (seconds): the held-out windows are whole minutes of them
        self.layout = ""  # the preprocessing the features were made with: others are not comparable
        self.new = 0  # windows added since the last round this device answered
        self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                X, y, t = z["X"].astype(np.float32), [str(v) for v in z["y"].tolist()], z["t"].astype(np.float64)
                if not len(X) == len(y) == len(t):
                    raise ValueError(f"{len(X)} windows, {len(y)} labels and {len(t)} times")
                self.X, self.y, self.t = _frozen(X), y, _frozen(t)
                self.layout, self.new = str(z["layout"]), int(z["new"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # torn or foreign: start again
            log.warning("labelled windows in %s unreadable (%s): starting an empty store", self.path, exc)

    def add(self, layout: str, feats: np.ndarray, truths: list[str | None], starts: np.ndarray) -> None:
        """Keep the labelled windows that start after the newest one kept (a followed log is read again
        from its start when the agent restarts: those windows are kept once)."""
        if layout != self.layout or (self.X.size and self.X.shape[1] != feats.shape[1]):
            self.X, self.y, self.t = np.zeros((0, feats.shape[1]), np.float32), [], np.zeros(0)
            self.layout, self.new = layout, 0
        last = float(self.t.max()) if len(self.t) else -np.inf
        keep = [i for i, t in enumerate(truths) if t and float(starts[i]) > last]
        if not keep:
            return
        rows = np.asarray(feats[keep], dtype=np.float32)
        self.X = _frozen(np.concatenate([self.X.reshape(-1, rows.shape[1]), rows])[-self.capacity:])
        self.y = (self.y + [str(truths[i]) for i in keep])[-self.capacity:]
        self.t = _frozen(np.concatenate([self.t, np.asarray(starts, np.float64)[keep]])[-self.capacity:])
        self.new = min(self.new + len(keep), self.capacity)

    def save(self) -> None:
        """Write the windows (atomically: the last saved copy stays whole); an OSError (a full disk) leaves
        no partial file behind and is the caller's to say."""
        tmp = self.path.with_suffix(".tmp.npz")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, X=self.X, y=np.asarray(self.y, dtype=str), t=self.t, layout=np.array(self.layout),
                         new=np.array(self.new))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` read-only: the store's arrays are replaced when windows come, never written, so a round's thread
    reads them without a copy (#26 §5)."""
    a.flags.writeable = False
    return a


def _targets(task: str, labels: tuple[str, ...], y: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rows to use, targets): class indices of the model's labels, or the numbers of ``x;y`` targets."""
    if task == "classification":
        index = {label: i for i, label in enumerate(labels)}
        rows = [i for i, t in enumerate(y) if t in index]
        return np.asarray(rows, np.intp), np.asarray([index[y[i]] for i in rows], np.int64)
    rows, out = [], []
    for i, t in enumerate(y):
        try:
            out.append([float(v) for v in t.split(";")])
            rows.append(i)
        except ValueError:
            continue
    return np.asarray(rows, np.intp), np.asarray(out, np.float32).reshape(len(rows), -1)


def held_out(starts: np.ndarray, share: int = 5, block_s: float = 60.0) -> np.ndarray:
    """The windows of one minute in ``share`` (by their start time; the same windows in every round): the
    device scores models on them and never trains on them. Whole minutes, not single windows, because
    overlapping windows share readings: a neighbour trained on would give the answer away."""
    t = np.asarray(starts, np.float64)
    if len(t) < share:
        return np.zeros(len(t), bool)
    held = np.floor(t / block_s) % share == 0
    if not held.any() or held.mean() > 2 / share:  # a few minutes only: the latest fifth
        held = t >= np.sort(t)[len(t) - max(1, len(t) // share)]
    return held


class Learner:
    """Answers the rounds of one device (``edge-agent run``)."""

    def __init__(self, *, device_id: str, state_dir: Path, model_name: str, capacity: int,
                 trusted_key: Any, allow_unsigned: bool, running: Callable[[], Bundle | None],
                 publish: Callable[[str, bytes, float | None], None], topic: str, secure_audit: bool = False) -> None:
        self.device_id, self.running, self.publish, self.topic = device_id, running, publish, topic
        self.audit_dir = state_dir if secure_audit else None
        self.trusted_key, self.allow_unsigned = trusted_key, allow_unsigned
        self.store = WindowStore(state_dir / f"learn-{model_name}.npz", capacity)
        self._answered_path = state_dir / f"learn-{model_name}-rounds.json"
        self.pending = PendingAnswers(state_dir / f"answers-{model_name}")  # sent again until the hub's receipt
        self.answered: list[str] = self._read_answered()  # "<round>/<kind>": each answered once
        self._bases: dict[int, dict[str, np.ndarray]] = {}  # round -> the base it trained (to score it again)
        self._offered: bytes | None = None  # the retained announcement of the open round
        self._offers = 0  # announcements received: a new one is looked at even if it equals the last
        self._looked_at: tuple[Any, ...] = ()
        self._settled: tuple[Any, ...] = ()  # (announcement, model) whose verdict new windows cannot change
        self._repeats = Repeats()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] = {}  # the last round's outcome (logged)
        self.sent = 0  # updates published (metrics)
        self._saved_at = time.monotonic()
        self.unsaved: str | None = None  # why the windows could not be saved last time (a full disk)
        self._save_note = 0.0
        self.seat = SecureSeat(device_id, lambda payload: self.publish(self.topic, payload, None), trusted_key=trusted_key,
                               allow_unsigned=allow_unsigned, audit_dir=self.audit_dir)  # secure rounds

    def _read_answered(self) -> list[str]:
        try:
            return [str(x) for x in orjson.loads(self._answered_path.read_bytes())][-100:]
        except (OSError, ValueError, TypeError):
            return []

    # ----------------------------------------------------------------- from the agent

    def on_windows(self, layout: str, feats: np.ndarray, truths: list[str | None] | None, starts: np.ndarray) -> None:
        if truths is not None:
            self.store.add(layout, feats, truths, starts)

    def offer(self, payload: bytes) -> None:
        """An announcement arrived (paho's thread); an empty one: no round is open."""
        with self._lock:
            self._offered = payload or None
            self._offers += 1

    def on_answered(self, payload: bytes) -> None:
        """The hub's receipt for one of this device's answers (paho's thread): it is not sent again."""
        try:
            receipt = decode_answer_receipt(payload)
        except ContractError as exc:
            log.warning("answer receipt refused: %s", exc)
            return
        if receipt.device_id == self.device_id and self.pending.done(receipt.sha256):
            log.info("round %d: the hub committed this device's answer (%s)", receipt.round_id, receipt.verdict)

    def offer_step(self, payload: bytes) -> None:
        """The hub's next step for this device in a secure round arrived (paho's thread)."""
        self.seat.offer(payload)

    def tick(self) -> None:
        """Between chunks and while a live source is quiet (the agent's thread): answer the open round
        once it fits. It is looked at again whenever it, the running model or the new windows change,
        so a device that had too few windows answers once it has enough, before the deadline."""
        if time.monotonic() - self._saved_at > 30.0:
            self.save()
        for name, kept, expiry_s in self.pending.due():  # no receipt yet: the hub may never have had it
            log.info("round answer %s: no receipt from the hub yet, sent again", name)
            self.publish(self.topic, kept, expiry_s)
        self.seat.take_step()
        with self._lock:
            payload, offers = self._offered, self._offers
        if payload is None or (self._thread is not None and self._thread.is_alive()):
            return
        bundle = self.running()
        settled = (offers, bundle.manifest.sha256 if bundle else None)
        key = (*settled, len(self.store.y), self.store.new)
        if key == self._looked_at or settled == self._settled:
            return
        self._looked_at = key
        why, ann = self._check(payload)
        if ann is None:
            # said when its words change, its counts (windows held, new) at most once a minute: with the counts in
            # the text, an agent waiting to join a round logged 120 lines a minute
            if why and self._repeats.say(why, time.monotonic()):
                log.info("%s", why)
            if why is None or "labelled windows" not in why:  # only new windows could change this verdict
                self._settled = settled
            return
        # The store's arrays are replaced, never written (read-only): the round reads them as they are now, no copy.
        X, y, t = self.store.X, list(self.store.y), self.store.t
        if ann.plan.kind == "train":
            self.store.new = 0
        self.save()
        labels = bundle.manifest.labels if bundle is not None else ()  # of the model the round was checked against
        work, args = (self._train, (ann, X, y, t, labels)) if ann.plan.kind == "train" else \
            (self._evaluate, (ann, X, y, t, bundle))
        self._thread = threading.Thread(target=_one_blas_thread, args=(work, *args), name="edge-agent-learn",
                                        daemon=True)
        self._thread.start()

    def _check(self, payload: bytes) -> tuple[str | None, Announcement | None]:
        try:
            ann = check_round(payload, trusted_key=self.trusted_key, allow_unsigned=self.allow_unsigned)
        except BundleRejected as exc:
            return f"round announcement refused: {exc}", None
        except Exception as exc:  # a retained message: dying here would die again at every start
            return f"round announcement refused ({type(exc).__name__}: {exc})", None
        p = ann.plan
        if f"{p.round_id}/{p.kind}" in self.answered:
            return None, None
        if self.device_id not in p.participants:
            return f"round {p.round_id}: not selected", None
        if p.kind == "evaluate" and p.round_id not in self._bases:
            return f"round {p.round_id}: asked to evaluate, but this device did not train in it: not answering", None
        bundle = self.running()
        if bundle is None or bundle.manifest.version != p.base_version or bundle.manifest.sha256 != p.base_sha256:
            have = "no model" if bundle is None else f"v{bundle.manifest.version}"
            return f"round {p.round_id} trains v{p.base_version}, this device runs {have}: not answering", None
        if time.time() > p.deadline:
            return f"round {p.round_id}: its deadline has passed", None
        if p.secure is not None:  # its keys go out at once; its masked delta once it has trained
            if f"{p.round_id}/secure" not in self.answered:
                self._answered(p.round_id, "secure")  # first: a device that restarts never sends a second advert
                self.seat.join(p)
            if not self.seat.joined(p.round_id):
                return (f"round {p.round_id}: this device joined the secure round before it restarted; its keys "
                        "are gone: not answering"), None
        held = len(self.store.y)
        if held < p.min_windows or self.store.new < p.min_new:
            return (f"round {p.round_id}: {held} labelled windows ({self.store.new} new), the round wants "
                    f"{p.min_windows} ({p.min_new} new): not answering yet"), None
        return None, ann

    def _train(self, ann: Announcement, X: np.ndarray, y: list[str], t: np.ndarray, labels: tuple[str, ...]) -> None:
        from edge_agent.device import learn

        p = ann.plan
        try:
            rows, target = _targets(p.task, labels, y)
            if len(rows) < p.min_windows:
                log.info("round %d: only %d windows have labels of this model: not answering", p.round_id, len(rows))
                return
            held = held_out(t[rows])
            self._bases = {p.round_id: dict(ann.weights)}  # its evaluation compares the candidate with it
            n_layers = sum(1 for t in p.trainable if t.startswith("coef_"))
            res = learn.fine_tune(
                dict(ann.weights), p.task, X[rows][~held], target[~held], epochs=p.epochs, lr=p.lr, batch=p.batch,
                mu=p.mu, alpha=p.alpha, clip=p.clip, train_layers=n_layers, seed=p.round_id, budget_s=p.budget_s)
            if held.any():  # scores on the device's windows that no round ever trains on
                res.metric_before = learn.score(ann.weights, p.task, X[rows][held], target[held])
                res.metric_after = learn.score(res.tensors, p.task, X[rows][held], target[held])
            res.tensors = {}  # the trained model is not sent (its delta is): 1.3 MB less while the update is made
            if p.secure is not None:
                self._trained_secure(p, res)
                return
            specs, arrays = encode_update_delta({k: res.delta[k] for k in p.trainable}, p.encoding)
            update = Update(
                round_id=p.round_id, device_id=self.device_id, model=p.model, base_version=p.base_version,
                n_examples=int(res.n), loss_before=float(res.loss_before), loss_after=float(res.loss_after),
                metric_before=float(res.metric_before), metric_after=float(res.metric_after),
                norm=float(res.norm), epochs=int(res.epochs), seconds=float(res.seconds),
                ranges=tuple(tuple(float(v) for v in r) for r in res.ranges),  # type: ignore[misc]
                encoding=p.encoding, tensors=specs, delta=arrays, sent=time.time())
            payload = update.encode()
            self.pending.put(p.round_id, p.kind, payload)
            self.publish(self.topic, payload, self.pending.first_expiry_s)
            self._answered(p.round_id, p.kind)
            self.sent += 1
            self.last = {"round": p.round_id, "n": int(res.n), "bytes": len(payload), "seconds": res.seconds,
                         "metric_before": res.metric_before, "metric_after": res.metric_after}
            log.info("round %d: trained on %d windows in %.1f s (%d epochs; %s %.3f -> %.3f), sent %s bytes",
                     p.round_id, res.n, res.seconds, res.epochs,
                     "accuracy" if p.task == "classification" else "error", res.metric_before, res.metric_after,
                     f"{len(payload):,}")
        except (ValueError, ContractError, FloatingPointError) as exc:
            log.error("round %d: training failed: %s", p.round_id, exc)
        except Exception:  # a bug must not take inference down with it
            log.exception("round %d: training failed", p.round_id)

    # ----------------------------------------------------------------- secure rounds

    def _trained_secure(self, p: RoundPlan, res: Any) -> None:
        """A secure round's training result: on the round's grid, masked and sent once the peers' shares are in."""
        stats = {"n_examples": float(res.n), "loss_before": float(res.loss_before), "loss_after": float(res.loss_after),
                 "metric_before": float(res.metric_before), "metric_after": float(res.metric_after),
                 "norm": float(res.norm)}
        held = self.seat.trained(p, res.delta, stats, res.ranges)
        self._answered(p.round_id, p.kind)
        self.sent += 1
        self.last = {"round": p.round_id, "n": int(res.n), "seconds": res.seconds, "secure": True,
                     "metric_before": res.metric_before, "metric_after": res.metric_after}
        log.info("round %d: trained on %d windows in %.1f s (%d epochs; %s %.3f -> %.3f); masked and sent once the "
                 "peers' shares are in%s", p.round_id, res.n, res.seconds, res.epochs,
                 "accuracy" if p.task == "classification" else "error", res.metric_before, res.metric_after,
                 f" ({held} values held to the grid)" if held else "")

    def _evaluate(self, ann: Announcement, X: np.ndarray, y: list[str], t: np.ndarray, running: Bundle) -> None:
        """The round's candidate and the base it trained, scored on the same held-out windows: their FP32
        weights, and the INT8 models (the one this device runs, the one the hub would ship)."""
        from edge_agent.device import learn

        p = ann.plan
        try:
            labels = running.manifest.labels
            rows, target = _targets(p.task, labels, y)
            held = held_out(t[rows])
            if not held.any():
                log.info("round %d: no held-out window to evaluate on", p.round_id)
                return
            Xh, yh = X[rows][held], target[held]
            t0 = time.monotonic()
            before, after = learn.score(self._bases[p.round_id], p.task, Xh, yh), learn.score(dict(ann.weights), p.task, Xh, yh)
            int8 = (None, None) if not ann.int8 else (int8_score(running, running.model, Xh, yh),
                                                      int8_score(running, ann.int8, Xh, yh))
            update = Update(
                round_id=p.round_id, device_id=self.device_id, model=p.model, base_version=p.base_version,
                n_examples=int(held.sum()), loss_before=0.0, loss_after=0.0, metric_before=before, metric_after=after,
                norm=0.0, epochs=0, seconds=time.monotonic() - t0, ranges=(), encoding=p.encoding, tensors=(),
                delta={}, sent=time.time(), kind="evaluate", int8_before=int8[0], int8_after=int8[1])
            payload = update.encode()
            self.pending.put(p.round_id, p.kind, payload)
            self.publish(self.topic, payload, self.pending.first_expiry_s)
            self._answered(p.round_id, p.kind)
            self.sent += 1
            log.info("round %d: evaluated the candidate on %d held-out windows: %.3f (the base: %.3f); INT8 %s (%s)",
                     p.round_id, int(held.sum()), after, before, *("-" if v is None else f"{v:.3f}" for v in int8[::-1]))
        except (ValueError, ContractError, FloatingPointError) as exc:
            log.error("round %d: evaluation failed: %s", p.round_id, exc)
        except Exception:  # a bug must not take inference down with it
            log.exception("round %d: evaluation failed", p.round_id)

    def _answered(self, round_id: int, kind: str) -> None:
        """Once its answer is handed to MQTT (a device stopped before that answers again after its restart)."""
        self.answered = [*self.answered, f"{round_id}/{kind}"][-100:]
        tmp = self._answered_path.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(self.answered))
            os.replace(tmp, self._answered_path)
        except OSError as exc:  # a full disk: known in this process; after a restart it may answer again
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("round %d: cannot record the answer in %s (%s)", round_id, self._answered_path, exc)

    def save(self) -> None:
        self._saved_at = time.monotonic()
        try:
            self.store.save()
        except OSError as exc:
            # Inference goes on and the windows stay in memory (bounded by learn_windows) for the rounds of
            # this process; a restart before a save succeeds starts from the last saved copy.
            self.unsaved = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
            if time.monotonic() >= self._save_note:
                self._save_note = time.monotonic() + _SAVE_NOTE_S
                log.warning("cannot save %d labelled windows to %s (%s): kept in memory only, trying again "
                            "every 30 s", len(self.store.y), self.store.path, self.unsaved)
            return
        if self.unsaved is not None:
            log.info("labelled windows saved to %s again (%d)", self.store.path, len(self.store.y))
        self.unsaved = None
        self._save_note = 0.0

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self.save()


def _one_blas_thread(work: Callable[..., None], *args: Any) -> None:
    """Run a round's training or evaluation with one BLAS thread. Its matrix products are small (64-row
    batches of a 512-unit MLP): numpy's default of a thread per core spends more time handing them out and
    spinning than computing, and takes the cores inference runs on (one fine-tune of a watch device on 2
    busy cores: 3-13 s and 2-9 CPU-s with 2 threads, 0.4 s and 0.24 CPU-s with one).

    OpenBLAS (pthreads) keeps one count for the whole process: the agent's own numpy shares it while a round
    runs, and threadpoolctl lets one thread at a time set it (nothing else in the agent does). An OpenMP
    BLAS counts per thread, hence this thread. OPENBLAS_NUM_THREADS would not do: BLAS reads it when numpy
    is imported, long before a round."""
    heap.trim()  # the free pages v2's swap and the last round left go back before this round: -0.8 MB (#26 §5)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            work(*args)
    finally:
        heap.trim()



def int8_score(running: Bundle, model: bytes, X: np.ndarray, y: np.ndarray) -> float:
    """:func:`edge_agent.device.learn.metric` of an ONNX ``model`` of the running one's kind (its manifest: labels,
    input, preprocessing) on feature rows ``X``, run as the agent runs a bundle; ``y`` as ``_targets`` gives."""
    from edge_agent.device import learn
    from edge_agent.runner import ModelRunner

    runner = ModelRunner(Bundle(replace(running.manifest, sha256=hashlib.sha256(model).hexdigest()), model))
    pred = runner.predict(np.asarray(X, np.float32))
    if pred.labels is None:
        return learn.metric(running.manifest.task, np.asarray(pred.values), y)
    index = {label: i for i, label in enumerate(running.manifest.labels)}
    return learn.metric(running.manifest.task, np.asarray([index[label] for label in pred.labels]), y)


__all__ = ["Learner", "WindowStore", "UPDATE_DELIVERY", "int8_score"]
