"""Closing a federated round: aggregate the counted updates, re-quantize, evaluate, gate, register, publish.

Loaded by the coordinator (:mod:`cloud_hub.rounds.coordinator`) when a round closes. The FP32 master copy is the
base's weights blob (:mod:`cloud_hub.models.weights`: its arrays and its FP32 ONNX graph, refilled with the new
layers) and the INT8 model the base's INT8 graph with the new numbers (:mod:`cloud_hub.models.int8`), so a round
needs onnx but not scikit-learn, skl2onnx or onnxruntime (loaded only to score a hold-out log). The old ways stay
for what these cannot read: a base registered without its graph (none after revision ``0006_fp32_graph``) is
exported with scikit-learn, and one whose INT8 model has a weight scale per output unit is quantized by onnxruntime.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import select
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import sqlalchemy as sa

from cloud_hub.data import sessions
from cloud_hub.data.aggregate import shaped_by
from cloud_hub.data.store import ModelRow, Store
from cloud_hub.data.summaries import describe_score
from cloud_hub.models import quantize, weights
from cloud_hub.models.datasets import computed, windows_from_logs
from cloud_hub.models.int8 import relu_outputs, requantize
from cloud_hub.models.lifecycle import next_version, passes_gate, register
from cloud_hub.rounds import fedavg, privacy
from cloud_hub.rounds.secure import Summed
from cloud_hub.rounds.store import RoundRow
from cloud_hub.settings import HubSettings
from edge_agent import heap
from edge_agent.contract import Bundle, Manifest, decode_bundle, manifest_from_obj
from edge_agent.contract.privacy import DpParams
from edge_agent.contract.round_updates import Update, decode_update
from edge_agent.preprocess import PreprocessParams, extract_features

log = logging.getLogger(__name__)
SCORE_TIMEOUT_S = 600.0  # the forked scoring of a hold-out log (_score_apart): seconds, then it is killed


def fleet_view(updates: Sequence[Update]) -> dict[str, Any]:
    """What the devices measured on their own windows, weighted by their example counts: the base's
    score before training (a federated evaluation of the running version) and their local models' after."""
    n = sum(u.n_examples for u in updates)
    if not n:
        return {}

    def mean(get: Any) -> float:
        return float(sum(get(u) * u.n_examples for u in updates) / n)

    return {"examples": n, "metric_before": mean(lambda u: u.metric_before),
            "metric_after": mean(lambda u: u.metric_after), "loss_before": mean(lambda u: u.loss_before),
            "loss_after": mean(lambda u: u.loss_after)}


def finish(engine: sa.Engine, settings: HubSettings, r: RoundRow, counted: Sequence[tuple[str, int, bytes]], *,
           signing_key: str | None, allow_unsigned: bool,
           evaluate: Callable[[dict[str, np.ndarray], bytes], dict[str, Any] | None], summed: Summed | None = None,
           privacy: dict[str, Any] | None = None) -> tuple[str, int | None, dict[str, Any], str]:
    """(state, new version, outcome, reason) of a closed round; the new version is registered (and published).

    The gate judges the INT8 model that ships against the running one: on the round's hold-out logs when it
    has some, else in the devices' own evaluation (``evaluate(FP32 tensors, INT8 model)``: the devices that
    trained score both, and the base, on windows they never train on; :func:`fedavg.evaluation`).

    With differential privacy (the plan's ``dp``; ``privacy``: what the round spent, :mod:`cloud_hub.rounds.privacy`)
    the INT8 model keeps the base's activation ranges (the devices' are not noised), a central round weighs every
    update alike and adds its noise here, and the new version's manifest states the model's epsilon."""
    updates = [(decode_update(payload), staleness) for _device, staleness, payload in counted]
    outcome: dict[str, Any] = {
        "counted": len(updates), "upload_bytes": sum(len(p) for _d, _s, p in counted),
        "federated": fleet_view([u for u, _ in updates]),
    }
    if "dp" in r.plan:  # what the devices measured is not noised: never released (the manifest, rounds, the page)
        outcome["federated"] = {}
    if summed is not None:  # a secure round: only the sum (its mean, its statistics' means) is known
        outcome |= summed.outcome | {"counted": len(summed.survivors)}
        if "dp" in r.plan:
            outcome["federated"] = {}
    elif not updates:
        return "failed", None, outcome, "no update counted by the deadline: the model is unchanged"
    store = Store(engine)
    ship = partial(_ship, engine, settings, store, r.model_name, signing_key=signing_key,
                   allow_unsigned=allow_unsigned)
    done = _made_by(store, engine, r)
    if done is not None:  # a coordinator stopped after registering it: finish that version, do not make another
        gate = str((done.metrics or {}).get("gate", "registered before the coordinator stopped"))
        if done.state in ("published", "rejected"):
            return done.state, done.version, outcome, gate
        return ship(done.version, outcome, gate, f"{gate}; registered but not published: a canary is open")
    with sessions.transaction(engine, write=False) as conn:
        base = store.get_model(conn, r.model_name, r.base_version)
        blob = store.get_weights(conn, r.model_name, r.base_version)
        version = next_version(store, conn, r.model_name)
        rows = store.list_models(conn, r.model_name)
    if base is None or blob is None or base.bundle is None:
        return "failed", None, outcome, f"base v{r.base_version} is no longer in the registry"
    _give_back()  # what the round's answers and the last round left: the aggregation's peak starts lower
    t0 = time.monotonic()
    base_int8 = decode_bundle(base.bundle).model  # the template of the new INT8 model (int8.requantize)
    c = _aggregate(r, updates, blob, base.manifest, rows, base_int8) if summed is None else \
        _from_sum(r, summed, blob, base.manifest, rows, base_int8)
    outcome["aggregate_s"] = round(time.monotonic() - t0, 3)
    metrics: dict[str, Any] = {"federated": {**outcome["federated"], "round": r.id}}
    holdout = [str(p) for p in r.plan.get("holdout_logs", [])]  # the round's own gate, also when resumed
    if holdout:
        ok, gate, held, judged, seen = _holdout_gate(r, version, holdout, c.manifest.preprocess, c.fp32, c.int8,
                                                     decode_bundle(base.bundle).model, c.shaped)
    else:
        ok, gate, judged, seen = _evaluation_gate(r, version, evaluate(c.tensors, c.int8), c.fp32, c.int8)
        held = []  # the devices that trained it judged it, on windows they never trained on
    metrics |= judged
    outcome |= seen
    state = "publishable" if ok else "rejected"
    register(engine, _bundle(r, version, c, metrics | {"gate": gate}, outcome["counted"], held, privacy),
             c.weights, state)
    outcome |= {"int8_bytes": len(c.int8), "gate": gate}
    if state == "rejected":
        return "rejected", version, outcome, gate
    # a canary opened while the round ran: its promotion would replace the new version
    return ship(version, outcome, gate, f"{gate}; v{version} is registered but not published: a canary is open")


@dataclass(frozen=True)
class _Candidate:
    """A round's new version before its gate: the FedAvg of the counted updates on the base's FP32 master
    copy, its FP32 ONNX model, and its INT8 model quantized from the devices' ranges."""

    weights: bytes  # the FP32 master copy stored as the version's weights (arrays and FP32 graph)
    tensors: dict[str, np.ndarray]  # its MLP tensors, what the devices evaluate
    manifest: Manifest  # the base's
    participants: list[str]  # the devices whose updates were counted
    shaped: frozenset[str]  # every device whose data shaped it: none of them is held out for it
    fp32: bytes
    int8: bytes


def _aggregate(r: RoundRow, updates: Sequence[tuple[Update, int]], blob: bytes, base_manifest: dict[str, Any],
               rows: Sequence[ModelRow], base_int8: bytes | None = None) -> _Candidate:
    """The counted (update, staleness) aggregated on the base's FP32 weights ``blob`` by the plan's rule
    (:func:`fedavg.aggregate`: FedAvg, each weighted by its capped example count and its staleness, or a
    robust rule), each clipped to the plan's clip, then FP32 ONNX and INT8 from the devices' merged
    activation ranges (no data needed). With central differential privacy: every update weighs the same, and
    the mean gets the noise (:func:`privacy.central_noise`)."""
    master = weights.tensors(blob)
    counts = fedavg.capped_examples([u.n_examples for u, _ in updates])
    rule = str(r.plan.get("aggregate", "fedavg"))  # a round opened before the plan named its rule: FedAvg
    dp = DpParams.from_obj(r.plan["dp"]) if "dp" in r.plan else None
    clip = float(r.plan["clip"])
    new = fedavg.aggregate(master, [fedavg.Contribution(u.dequantized(), 1 if dp else k, 0 if dp else s)
                                    for (u, s), k in zip(updates, counts, strict=True)], clip=clip, rule=rule)
    if dp is not None:
        # the round's own seed (stored when it opened): a finish resumed after a crash draws the same noise, not a
        # second noisy view of the same sum; a trusted hub's database holds the plain updates anyway
        rng = np.random.default_rng(r.plan.get("dp_seed"))
        new = privacy.central_noise(new, r.plan["trainable"], dp.noise, clip, len(updates), rng)
    return _candidate(r, blob, new, sorted({u.device_id for u, _ in updates}),
                      [list(u.ranges) for u, _ in updates], base_manifest, rows, base_int8)


def _from_sum(r: RoundRow, summed: Summed, blob: bytes, base_manifest: dict[str, Any],
              rows: Sequence[ModelRow], base_int8: bytes | None = None) -> _Candidate:
    """A secure round's candidate: the base's FP32 weights plus the survivors' mean delta (each clipped on its
    device), INT8 from their mean activation ranges (the hub sees no device's own)."""
    master = weights.tensors(blob)
    new = {k: (v + summed.delta[k]).astype(np.float32) if k in summed.delta else v for k, v in master.items()}
    return _candidate(r, blob, new, summed.survivors, [summed.ranges], base_manifest, rows, base_int8)


def _candidate(r: RoundRow, blob: bytes, new: dict[str, np.ndarray], participants: list[str],
               ranges: Sequence[Sequence[Sequence[float]]], base_manifest: dict[str, Any],
               rows: Sequence[ModelRow], base_int8: bytes | None = None) -> _Candidate:
    manifest = manifest_from_obj(base_manifest)
    # none of them is held out for the new version: the base's devices, every round's, this round's
    shaped = shaped_by({(m.name, m.version): m.manifest for m in rows}).get((r.model_name, r.base_version),
                                                                          frozenset()) | set(participants)
    fp32 = _fp32(blob, new, manifest.n_features)
    if base_int8 is not None and "dp" in r.plan:  # differential privacy: the base's ranges, not the devices'
        ranges = [fedavg.ranges_of(base_int8)]
    merged = fedavg.merge_ranges(ranges)
    # the base's INT8 graph with the new numbers: the bytes onnxruntime's quantizer gives, without loading it
    int8 = None if base_int8 is None else requantize(base_int8, new, merged, relu_outputs(fp32))
    if int8 is None:  # no base model to follow, or one quantized per output unit: onnxruntime quantizes it
        int8 = fedavg.quantize_from_ranges(fp32, merged)
    return _Candidate(weights.with_tensors(blob, new, fp32), new, manifest, participants, shaped, fp32, int8)


def _fp32(blob: bytes, new: dict[str, np.ndarray], n_features: int) -> bytes:
    """The FP32 ONNX model of the base's weights ``blob`` with the layers ``new``: its stored graph refilled
    (:func:`weights.fill_graph`), or, for a base stored without one, exported with scikit-learn and skl2onnx."""
    graph = weights.graph(blob)
    if graph is not None:
        return weights.fill_graph(graph, new)
    from cloud_hub.models import training

    log.info("the base's weights hold no FP32 graph (registered before revision 0006): exporting it with skl2onnx")
    return training.export_onnx(fedavg.with_tensors(weights.from_bytes(blob), new), n_features)


def _bundle(r: RoundRow, version: int, c: _Candidate, metrics: dict[str, Any], n_updates: int,
            held: list[str], privacy: dict[str, Any] | None = None) -> Bundle:
    """The new version's bundle (unsigned): its INT8 model, the base's manifest with this round's record."""
    return Bundle(replace(
        c.manifest, version=version, sha256=hashlib.sha256(c.int8).hexdigest(), created=time.time(),
        metrics=metrics, key_id=None, signature=None,
        training={**c.manifest.training, "source": "federated", "round": r.id, "parent_version": r.base_version,
                  "updates": n_updates, "devices": c.participants, "shaped_by": sorted(c.shaped),
                  "holdout_devices": held, "warm_start": True} | ({"privacy": privacy} if privacy else {})), c.int8)


def _ship(engine: sa.Engine, settings: HubSettings, store: Store, name: str, version: int, outcome: dict[str, Any],
          gate: str, held_back: str, *, signing_key: str | None, allow_unsigned: bool
          ) -> tuple[str, int | None, dict[str, Any], str]:
    """Publish the round's registered ``version`` of ``name``; the round fails with ``held_back`` instead
    while a canary of ``name`` is open (its promotion would replace the new version)."""
    if _canary_open(store, engine, name):
        return "failed", version, outcome, held_back
    from cloud_hub.rollout.publish import publish

    publish(engine, settings, version=version, signing_key=signing_key, allow_unsigned=allow_unsigned)
    return "published", version, outcome, gate


def _holdout_gate(r: RoundRow, version: int, logs: list[str], preprocess: dict[str, Any], fp32: bytes, int8: bytes,
                  running: bytes, shaped: frozenset[str]
                  ) -> tuple[bool, str, list[str], dict[str, Any], dict[str, Any]]:
    """(passes, gate, held-out devices, metrics, outcome): the INT8 model against the running one on the
    round's hold-out logs, the FP32 model beside them."""
    tolerance = float(r.plan.get("tolerance", 0.0))
    X, y, devices = _holdout_features(logs, preprocess)
    m_new, m_fp32, m_base = _score_apart([int8, fp32, running], X, y)
    ok = passes_gate(m_new, m_base, tolerance)
    not_held = sorted(set(devices.tolist()) & shaped)
    gate = (f"v{version} INT8 {describe_score(m_new)} (FP32 {describe_score(m_fp32)}) vs running v{r.base_version} INT8 {describe_score(m_base)} "
            f"on the hold-out logs ({len(y)} windows, the figures' own; tolerance {tolerance:g}"
            + (f"; not held out: {', '.join(not_held)} shaped v{version}" if not_held else "")
            + f"): {'pass' if ok else 'fail'}")
    held = sorted(set(devices.tolist()) - shaped)
    on = f"hold-out logs: {len(y)} windows of {', '.join(held) or 'no device it never learned from'} (the gate's own)"
    return ok, gate, held, {"int8": m_new, "fp32": m_fp32, "baseline_int8": m_base, "evaluated_on": on}, {
        "holdout_before": _score(m_base), "holdout_after": _score(m_new), "holdout_fp32_after": _score(m_fp32)}


#: the last hold-out log's features: ((path, size, mtime) of each log, preprocessing) -> (X, y, devices)
_held: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _holdout_features(logs: list[str], preprocess: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, devices) of the windows of ``logs`` under ``preprocess``, read again only when a
    log or the preprocessing changed: every round of a model gates on the same logs, and reading them
    (5.6 MB of raw windows and the CSV reader's chunks for the demo's log) was the peak of a round's RSS."""
    def stat(path: str) -> tuple[str, int, int]:
        try:
            st = os.stat(path)
        except OSError:  # windows_from_logs says what is wrong with it
            return path, -1, -1
        return path, st.st_size, st.st_mtime_ns

    key = (tuple(stat(p) for p in logs), json.dumps(preprocess, sort_keys=True, default=str))
    if key not in _held:
        params = PreprocessParams.from_dict(preprocess)
        data, y, devices, _starts = windows_from_logs(logs, params)
        X = extract_features(data, params)
        del data, _starts  # only the features are scored
        ok = computed(X, ", ".join(logs))
        X, y, devices = X[ok], y[ok], devices[ok]
        _held.clear()
        _held[key] = (X, y, devices)
    return _held[key]


def _score_apart(models: Sequence[bytes], X: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
    """:func:`quantize.evaluate` of each model on ``(X, y)``, one after the other, in a child process forked for
    it: onnxruntime and its sessions (about 40 MB, its libraries' pages for the most part) are loaded there and
    gone when it exits, not kept by ``federate`` for the rest of its life (issue #26 §5; docs/federated.md). The
    scores are those of the same code on the same arrays; without ``fork`` (not POSIX) they are computed here."""
    score = partial(quantize.evaluate, X=X, y=y, latency_runs=20, warmup=2, batch=256, lean=True)
    if not hasattr(os, "fork"):
        return [score(m) for m in models]
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it only scores and writes; os._exit runs none of the parent's exit hooks
        status = 0
        try:
            os.close(rd)
            try:
                out: tuple[Any, ...] = ("ok", [score(m) for m in models])
            except Exception as exc:  # sent to the parent, which raises it
                out = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
            with os.fdopen(wr, "wb") as f:
                pickle.dump(out, f)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(wr)
    try:
        sent = _read_all(rd, SCORE_TIMEOUT_S)
    except BaseException:  # no scores in time, or federate stopped meanwhile: the child goes too
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(rd)
    _pid, status = os.waitpid(pid, 0)
    if not sent:
        raise RuntimeError(f"scoring the hold-out log: its process ended with status {status} and no scores")
    kind, value = pickle.loads(sent)
    if kind == "error":
        raise value
    return list(value)


def _read_all(fd: int, timeout: float) -> bytes:
    """Everything written to the pipe ``fd`` until its writer closes it, within ``timeout`` seconds (a child
    that hangs, e.g. on a lock a thread of the parent held when it forked, must not hang ``federate``)."""
    parts: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"scoring the hold-out log: no scores from its process within {timeout:g} s")
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


def _give_back() -> None:
    """Collect what the last step left and hand the heap's free memory back to the OS (glibc's
    ``malloc_trim``; elsewhere only the collection): the hold-out gate's peak then starts from what is alive."""
    gc.collect()
    heap.trim()


def _evaluation_gate(r: RoundRow, version: int, fed: dict[str, Any] | None, fp32: bytes, int8: bytes
                     ) -> tuple[bool, str, dict[str, Any], dict[str, Any]]:
    """(passes, gate, metrics, outcome): the devices' own evaluation (:func:`fedavg.evaluation`), decided on
    the INT8 models, the one that would ship against the one running; their FP32 weights reported beside."""
    if fed is None:
        return False, f"v{version}: no device evaluated it by the deadline, so it is not published", {}, {}
    classifier = r.plan.get("task") == "classification"
    tolerance = float(r.plan.get("tolerance", 0.0))
    what = (lambda x: f"{100 * x:.1f}%") if classifier else (lambda x: f"mean error {x:.3g}")
    key = "accuracy" if classifier else "mean_error"
    n, devices = fed["windows"], fed["devices"]
    on = (f"federated evaluation: {n} held-out windows of {', '.join(devices)} (the devices that trained it, on "
          "windows they never train on; the gate's own)")
    metrics = {"fp32": {key: fed["after"], "n": n, "bytes": len(fp32)}, "baseline_fp32": {key: fed["before"], "n": n},
               "evaluated_on": on}
    seen = {"evaluation_fp32_before": fed["before"], "evaluation_fp32_after": fed["after"], "evaluated_by": devices}
    fp32_text = f"FP32 weights {what(fed['after'])} vs {what(fed['before'])}"
    if "int8_after" not in fed:  # only devices that predate INT8 evaluations answered: the shipped model is unjudged
        return False, (f"v{version}: no device scored its INT8 model ({fp32_text} on {n} held-out windows of "
                       f"{len(devices)} devices), so it is not published"), metrics | {"int8": {"bytes": len(int8)}}, seen
    before, after = fed["int8_before"], fed["int8_after"]
    ok = passes_gate({key: after}, {key: before}, tolerance)  # the one gate: retrains' and hold-out logs'
    worse = _one_device_worse(fed.get("int8_each", {}), key, tolerance, what)
    gate = (f"v{version} INT8 {what(after)} vs running v{r.base_version} INT8 {what(before)} in the devices' own "
            f"evaluation ({fed['int8_windows']} held-out windows of {len(fed['int8_devices'])} devices, the same "
            f"windows as these figures; {fp32_text}; tolerance {tolerance:g})"
            + (f"; {worse}" if worse else "") + f": {'pass' if ok and not worse else 'fail'}")
    ok = ok and not worse
    metrics |= {"int8": {key: after, "n": fed["int8_windows"], "bytes": len(int8)},
                "baseline_int8": {key: before, "n": fed["int8_windows"]}}
    return ok, gate, metrics, seen | {"evaluation_before": before, "evaluation_after": after}


GATE_MIN_DEVICES = 3
"""Fewer devices than this scoring a candidate, and the weighted gate cannot outvote one of them (a hostile device's
finding: of two devices, one stating 2**40 windows scored 0 % → 100 % and a model that predicts one class was
published and signed). Then every one of them must pass the gate on its own: one device can hold a round back, never
push one through. With this many or more, the capped weights (:func:`fedavg.capped_examples`) decide."""


def _one_device_worse(each: dict[str, tuple[float, float]], key: str, tolerance: float, what: Any) -> str | None:
    """Why a candidate that fewer than :data:`GATE_MIN_DEVICES` devices scored fails on one of them, or None."""
    if not each or len(each) >= GATE_MIN_DEVICES:
        return None
    failing = sorted(d for d, (b, a) in each.items() if not passes_gate({key: a}, {key: b}, tolerance))
    if not failing:
        return None
    d = failing[0]
    return (f"with fewer than {GATE_MIN_DEVICES} devices scoring it each must pass: {d} INT8 {what(each[d][1])} vs "
            f"{what(each[d][0])}" + (f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""))


def _made_by(store: Store, engine: sa.Engine, r: RoundRow) -> Any:
    """The version this round already registered, if any (its manifest names the round)."""
    with sessions.transaction(engine, write=False) as conn:
        rows = store.list_models(conn, r.model_name)
    return next((m for m in rows if m.manifest.get("training", {}).get("source") == "federated"
                 and m.manifest["training"].get("round") == r.id), None)


def _canary_open(store: Store, engine: sa.Engine, name: str) -> bool:
    with sessions.transaction(engine, write=False) as conn:
        return bool(store.rollouts(conn, name, state="canary"))


def _score(m: dict[str, Any]) -> float:
    return float(m["accuracy"]) if "accuracy" in m else float(m.get("mean_error", m.get("mae", np.nan)))
