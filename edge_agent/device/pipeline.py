"""Readings in, results into the outbox: windowing, features, inference, result encoding.

No broker and no clock here: the processor takes reading chunks and writes encoded results to the
outbox. Keys are deterministic: ``seq`` is the window start in milliseconds, so replaying the
same log with the same model produces the same keys and the hub stores each window once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_agent import exits
from edge_agent.contract import MAX_LABEL_CHARS, ContractError, Result, check_id, encode_result_obj
from edge_agent.device.outbox import Outbox
from edge_agent.drift import DeviceDrift
from edge_agent.preprocess import DeviceWindowers, PreprocessParams, WindowBatch, extract_features
from edge_agent.preprocess.features import MAX_NORMALIZED, computed_rows
from edge_agent.runner import ModelError, ModelRunner, Prediction

_GOLDEN = 2654435761  # Knuth's multiplicative hash: a deterministic "random" sample of windows

log = logging.getLogger(__name__)

OTHER_DEVICES_NAMED = 64
"""A live agent names (and counts) the first devices whose readings it skips; the rest are counted together."""


def window_seq(start: np.ndarray) -> np.ndarray:
    """The result key of each window: its start time in integer milliseconds."""
    return np.rint(np.asarray(start, dtype=np.float64) * 1000.0).astype(np.int64)


def sampled(seq: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic per-key sampling mask (the same windows are chosen on every replay)."""
    if fraction >= 1.0:
        return np.ones(len(seq), dtype=bool)
    h = (seq.astype(np.uint64) * np.uint64(_GOLDEN)) & np.uint64(0xFFFFFFFF)
    return h < np.uint64(int(fraction * 2**32))


class DeviceIdError(exits.Failure, ValueError):
    """A device id that cannot be used: invalid in the contract, or several under one --device-id."""

    exit_code = exits.INPUT


@dataclass
class ProcessStats:
    readings: int = 0
    windows: int = 0
    new_results: int = 0
    dropped_windows: int = 0  # windows dropped for missing data (preprocessing policy) or a reading out of range
    out_of_range: int = 0  # windows dropped for a reading out of range (MAX_NORMALIZED)
    devices: set[str] = field(default_factory=set)


class Processor:
    """Per-device windowers feeding one model runner; results go to the outbox."""

    def __init__(self, runner: ModelRunner, outbox: Outbox, *, source_channels: tuple[str, ...],
                 device_id: str | None = None, features: str = "off", features_sample: float = 0.1) -> None:
        self.outbox = outbox
        self.source_channels = tuple(source_channels)
        self.device_id = device_id
        self.features = features
        self.features_sample = features_sample
        self.stats = ProcessStats()
        self._source_of_override: str | None = None
        self._devices: dict[str, str] = {}  # source device id -> published device id (checked once)
        # A live agent runs one device (device_id): readings another device's id names are skipped and said, not a
        # stop (a restart would meet them again); a replay of a log of several devices under --device-id stops.
        self.one_device = False
        self.other_devices: dict[str, int] = {}  # skipped: source device id -> readings (at most OTHER_DEVICES_NAMED)
        self.other_devices_more = 0  # skipped readings of the devices past those, counted together
        self._dropped_said = (0, -math.inf)  # (dropped windows when last said, when): a live agent says them
        self._out_of_range_said = -math.inf  # when windows dropped for a reading out of range were last said
        self._source = "the source"  # named in errors
        self.runner = runner
        # a model that fails on real readings: the agent goes back to the model before it (True: swapped back)
        self.on_model_fault: Callable[[ModelError], bool] | None = None
        self._columns = self._column_index(runner.params)
        self._windowers = DeviceWindowers(runner.params)  # by source device id
        self.drift: DeviceDrift | None = None  # the model's meters, one a device; set by the agent
        self.on_inference: Callable[[float], None] | None = None  # latency of each inference call (metrics)
        # labelled windows for federated rounds (edge_agent/device/learner.py): (layout, features, truths, starts)
        self.on_labelled: Callable[[str, np.ndarray, list[str | None], np.ndarray], None] | None = None
        self._layout = _layout(runner.params)

    def _column_index(self, params: PreprocessParams) -> np.ndarray:
        missing = [c for c in params.channels if c not in self.source_channels]
        if missing:
            raise ValueError(f"model needs channels {missing}; the source has {list(self.source_channels)}")
        return np.array([self.source_channels.index(c) for c in params.channels], dtype=np.intp)

    def swap(self, runner: ModelRunner) -> None:
        """Serve the next windows with ``runner``. Windows in progress continue if the windowing is equal."""
        old = self.runner.params
        new = runner.params
        self._columns = self._column_index(new)
        if not _same_windows(old, new):
            self._windowers = DeviceWindowers(new)
        self.runner = runner
        self._layout = _layout(new)

    def _device(self, source_device: str) -> str:
        if self.device_id is None:
            try:
                return check_id(source_device)
            except ContractError as exc:  # it would name an MQTT topic: refuse it here, not at publish
                raise DeviceIdError(f"{self._source}: {exc.reason}") from exc
        if self._source_of_override is None:
            self._source_of_override = source_device
        elif self._source_of_override != source_device:
            raise DeviceIdError(
                f"--device-id renames a single-device log, but this log holds {self._source_of_override!r} "
                f"and {source_device!r}: `edge-agent replay` without --device-id replays each under its own id; "
                "`edge-agent run` is one device: give it that device's readings only"
            )
        return self.device_id

    def process(self, per_device: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                source: str = "the source") -> int:
        """Process readings grouped by device: ``{device: (ts, values[n, channels], labels|None)}``.

        The windows of all devices are featurized and inferred as one batch: per-call overhead of
        numpy and onnxruntime dominates small batches.
        """
        self._source = source
        skipped = []
        for source_device, (ts, _values, _labels) in per_device.items():
            device = self._devices.get(source_device)
            if device is None and source_device not in self.other_devices:
                try:
                    device = self._devices[source_device] = self._device(source_device)
                except DeviceIdError:
                    if not self.one_device or self.device_id is None:
                        raise
                    if len(self.other_devices) >= OTHER_DEVICES_NAMED:  # a stream of ever new ids: one line, a count
                        if not self.other_devices_more:
                            log.warning("%s: readings of more than %d other devices: skipped, counted, no longer "
                                        "named", source, OTHER_DEVICES_NAMED)
                        self.other_devices_more += len(ts)
                        skipped.append(source_device)
                        continue
                    log.warning("%s: readings of device %r skipped: this agent is one device, %r (device_id), and "
                                "takes the readings of %r; run another agent for %r", source, source_device[:64],
                                self.device_id, self._source_of_override, source_device[:64])
                    self.other_devices[source_device] = 0
            if device is None:
                self.other_devices[source_device] += len(ts)
                skipped.append(source_device)
                continue
            self.stats.devices.add(device)
            self.stats.readings += len(ts)
        if skipped:
            per_device = {d: v for d, v in per_device.items() if d not in skipped}
        ready: list[tuple[str, WindowBatch]] = []
        for source_device, batch in self._windowers.push(per_device, self._columns):
            self.stats.dropped_windows += batch.dropped
            if len(batch):
                ready.append((self._devices[source_device], batch))
        if self.one_device and self.stats.dropped_windows - self.stats.out_of_range > self._dropped_said[0]:
            self._say_dropped()
        if not ready:
            return 0
        runner = self.runner
        ready, feats = self._featurize(ready, runner)
        if not ready:
            return 0
        try:
            pred = runner.predict(feats)
        except ModelError as exc:  # e.g. NaN on real readings, which its warm-up on zeros did not show
            if self.on_model_fault is None or not self.on_model_fault(exc):
                raise
            if not _same_windows(runner.params, self.runner.params):  # the model gone back to cuts other windows
                self.stats.dropped_windows += len(feats)
                log.error("%d windows inferred by the refused model dropped: the model serving again cuts its "
                          "windows otherwise", len(feats))
                return 0
            runner = self.runner  # the same windows, its own features (a retrained model's normalization differs)
            ready, feats = self._featurize(ready, runner)
            if not ready:
                return 0
            pred = runner.predict(feats)
        parts: list[tuple[str, slice]] = []  # each device's windows in the batch
        offset = 0
        for device, batch in ready:
            parts.append((device, slice(offset, offset + len(batch))))
            offset += len(batch)
        if self.drift is not None:
            self.drift.add(parts, feats, pred.confidence)
        if self.on_inference is not None:
            self.on_inference(pred.latency_ms)
        rows: list[tuple[str, int, bytes]] = []
        for (device, batch), (_, part) in zip(ready, parts, strict=True):
            rows += self._results(device, batch, feats[part], pred, part)
            if self.on_labelled is not None and batch.labels is not None:
                self.on_labelled(self._layout, feats[part], _truths(batch.labels), batch.start)
        self.stats.windows += len(rows)
        added = self.outbox.put_many(rows)  # one transaction for every device of the chunk
        self.stats.new_results += added
        return added

    def _featurize(self, ready: list[tuple[str, WindowBatch]], runner: ModelRunner
                   ) -> tuple[list[tuple[str, WindowBatch]], np.ndarray]:
        """The features of the ready windows, and the windows they are of: a window that covers a reading out of
        range (a row of NaN, see ``MAX_NORMALIZED``) is dropped, counted and said, never inferred."""
        windows = ready[0][1] if len(ready) == 1 else WindowBatch.concat(b for _, b in ready)
        feats = extract_features(windows, runner.params)
        ok = computed_rows(feats)
        if ok.all():
            return ready, feats
        kept: list[tuple[str, WindowBatch]] = []
        offset = 0
        for device, batch in ready:
            keep = ok[offset : offset + len(batch)]
            offset += len(batch)
            if not keep.all():
                self._out_of_range(device, batch, int((~keep).sum()), runner.params)
            if keep.any():
                kept.append((device, batch.take(keep)))
        return kept, feats[ok]

    def _out_of_range(self, device: str, batch: WindowBatch, n: int, params: PreprocessParams) -> None:
        """Count windows dropped for a reading out of range; say so at most once a minute, naming the device and
        the batch's reading furthest from the model's training readings."""
        self.stats.dropped_windows += n
        self.stats.out_of_range += n
        now = time.monotonic()
        if now - self._out_of_range_said < 60.0:
            return
        self._out_of_range_said = now
        with np.errstate(over="ignore", invalid="ignore"):  # the reading furthest from the training readings
            far = np.abs((batch.values.astype(np.float64) - np.asarray(params.norm_mean)) / np.asarray(params.norm_std))
        row, col = np.unravel_index(int(np.argmax(np.nan_to_num(far, nan=0.0, posinf=np.inf))), far.shape)
        log.warning("%s: %d windows dropped so far (%d now, device %s): a reading of %.7g in %s, further than %g "
                    "standard deviations from the model's training readings: no sensor that works reads it (a dead "
                    "register, a rail); check the sensor", self._source, self.stats.out_of_range, n, device,
                    float(batch.values[row, col]), params.channels[col], MAX_NORMALIZED)

    def _say_dropped(self) -> None:
        """A live agent says (at most once a minute) that windows were dropped: a sensor that reports less often
        than the model's rate, or unevenly, gave readings and no results, said nowhere but in the metrics."""
        now = time.monotonic()
        if now - self._dropped_said[1] < 60.0:
            return
        p = self.runner.params
        missing = self.stats.dropped_windows - self.stats.out_of_range
        log.warning("%d windows dropped so far (a channel more than 20 %% missing in a window, readings faster "
                    "than the model's rate, or a gap over 1.5 sample periods): the model takes %g readings a second "
                    "in windows of %g s; the sensor must report that often", missing, p.sample_rate_hz, p.window_s)
        self._dropped_said = (missing, now)

    def _results(self, device: str, batch: WindowBatch, feats: np.ndarray, pred: Prediction, part: slice
                 ) -> list[tuple[str, int, bytes]]:
        seqs = window_seq(batch.start)
        send_features = (np.zeros(len(seqs), bool) if self.features == "off"
                         else sampled(seqs, 1.0 if self.features == "all" else self.features_sample))
        version = self.runner.version
        rows: list[tuple[str, int, bytes]] = []
        starts, ends, seq_list = batch.start.tolist(), batch.end.tolist(), seqs.tolist()
        truths = None if batch.labels is None else _truths(batch.labels)
        labels = pred.labels[part] if pred.labels is not None else None
        conf = pred.confidence[part].tolist() if pred.confidence is not None else None
        values = pred.values[part].tolist() if pred.values is not None else None
        for i, seq in enumerate(seq_list):
            result = Result(
                seq=seq, start=starts[i], end=ends[i], model_version=version, latency_ms=pred.latency_ms,
                label=labels[i] if labels is not None else None,
                confidence=conf[i] if conf is not None else None,
                value=tuple(values[i]) if values is not None else None,
                truth=truths[i] if truths is not None else None,
                features=tuple(feats[i].tolist()) if send_features[i] else None,
            )
            rows.append((device, seq, encode_result_obj(result)))
        return rows


def _same_windows(a: PreprocessParams, b: PreprocessParams) -> bool:
    """Whether two models cut the same windows from the same readings (their features may still differ)."""
    return (a.sample_rate_hz, a.window_s, a.hop_s, a.channels, a.missing, a.max_missing_frac) == (
        b.sample_rate_hz, b.window_s, b.hop_s, b.channels, b.missing, b.max_missing_frac)


def _layout(params: PreprocessParams) -> str:
    """What makes two feature vectors comparable: the preprocessing that made them."""
    return repr(sorted(params.to_dict().items()))


def _fitted(row: list[float]) -> str | None:
    """Several targets as a truth the contract carries (at most MAX_LABEL_CHARS): each number in full, or, for
    many outputs, to 6 significant digits; None (unknown) if even that is too long: the result still goes."""
    text = ";".join(map(repr, row))
    if len(text) > MAX_LABEL_CHARS:
        text = ";".join(format(v, ".6g") for v in row)
    return text if len(text) <= MAX_LABEL_CHARS else None


def _truths(labels: np.ndarray) -> list[str | None]:
    """Window ground truth as the contract carries it: text, or a number written out; None = unknown."""
    if labels.dtype.kind == "f":  # regression targets: the window's mean, NaN when a reading had none
        if labels.ndim == 2:  # several outputs: "x;y", as the log writes them
            return [None if any(v != v for v in row) else _fitted(row) for row in labels.tolist()]
        return [None if x != x else repr(x) for x in labels.tolist()]
    return [None if (x is None or x == "") else str(x) for x in labels.tolist()]
