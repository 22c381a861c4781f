"""One fuzz target per decoder: bytes in, and the property every decoder keeps (issue 29).

For any bytes a decoder returns a valid object or raises its own error type (``ContractError`` for
wire messages, which the hub dead-letters and the agent refuses; ``BundleRejected`` for a bundle or
announcement the device checks; ``LogError`` for logs; ``SettingsError`` for a config file). Any
other exception escapes the target and is a crash. A decoded object must also re-encode to an
equivalent one (the round trip), and the log parser's four paths (CSV and JSON Lines, each with its
vectorized and its line-by-line path) and its chunkings must agree row for row; a broken promise is
an :class:`AssertionError`, a crash too.

``TARGETS`` maps a name to its function; ``fuzz/corpus/<name>/`` holds its seeds (``fuzz.seeds``).
"""

from __future__ import annotations

import atexit
import dataclasses
import gzip
import hashlib
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cloud_hub.data.result_rows import fast_rows
from cloud_hub.data.sessions import pack_features
from edge_agent import contract as c
from edge_agent.contract import round_updates as cu
from edge_agent.contract import rounds as cr
from edge_agent.contract import secagg
from edge_agent.contract import secure_rounds as sr
from edge_agent.contract.answers import decode_answer_receipt
from edge_agent.device.bundle import BundleRejected, check_bundle, check_round, check_step
from edge_agent.preprocess import PreprocessParams
from edge_agent.settings.agent import AgentSettings
from edge_agent.settings.loader import SettingsError, load_settings
from edge_agent.sources import LineParser, LogError, read_log

Target = Callable[[bytes], None]


def _scratch() -> Path:
    """A folder for the files the file-reading decoders (gunzip, settings) are given: in RAM where there is
    /dev/shm, one per process, removed at exit; libFuzzer ends a run with C's exit(), past atexit, so
    the folders of processes that are gone are removed here too."""
    root = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    for old in root.glob("edgeml-fuzz-*"):
        pid = old.name.removeprefix("edgeml-fuzz-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"edgeml-fuzz-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return mine


_SCRATCH = _scratch()


# --------------------------------------------------------------------------- wire messages


def equivalent(a: Any, b: Any) -> bool:
    """Equal decoded messages; arrays (an announcement's weights, an update's delta) compared by value."""
    if isinstance(a, cr.Announcement):
        return a.plan == b.plan and a.weights.keys() == b.weights.keys() and all(
            np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    if isinstance(a, cu.Update):
        return (dataclasses.replace(a, delta={}) == dataclasses.replace(b, delta={})
                and a.delta.keys() == b.delta.keys() and all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta))
    return bool(a == b)


def _message(decode: Callable[[bytes], Any]) -> Target:
    def target(data: bytes) -> None:
        try:
            got = decode(data)
        except c.ContractError:
            return
        again = decode(got.encode())
        assert equivalent(again, got), f"round trip changed the message: {got!r} -> {again!r}"
    return target


def _checked(data: bytes, check: Callable[..., Any]) -> Any:
    """What a device accepts (no trusted key, unsigned allowed: the most it ever reads), else None."""
    try:
        return check(data, trusted_key=None, allow_unsigned=True)
    except BundleRejected:
        return None


def _device_in(data: bytes) -> str:
    """The device id a payload the contract refused names, where it names one (else any valid id): the fast
    path checks it against the topic's, so a mutant of another device still reaches its other checks."""
    try:
        device = orjson.loads(data).get("device_id")
    except (orjson.JSONDecodeError, AttributeError):
        return "dev-1"
    return device if c.valid_id(device) else "dev-1"


def results(data: bytes) -> None:
    """The contract's decoder round-trips, and the hub's fast path (cloud_hub/data/result_rows.py) accepts
    only what the contract accepts, giving the same rows."""
    _message(c.decode_results)(data)
    try:
        batch: c.ResultBatch | None = c.decode_results(data)
    except c.ContractError:
        batch = None
    device = batch.device_id if batch is not None else _device_in(data)
    got = fast_rows(data, device, 0.0)
    if got is None:
        return
    assert batch is not None, "the hub's fast path accepted a results payload the contract refuses"
    rows, mark = got
    assert mark is batch.mark_duplicates and len(rows) == len(batch.results), "the fast path's batch differs"
    for row, r in zip(rows, batch.results, strict=True):
        want = (batch.device_id, r.seq, r.start, r.end, r.model_version, r.label, r.confidence,
                None if r.value is None else list(r.value), r.truth, r.latency_ms,
                None if r.features is None else pack_features(r.features), 0.0)
        have = (*row[:7], None if row[7] is None else orjson.loads(row[7]), *row[8:])
        assert all(type(a) is type(b) and a == b and (type(a) is not float or repr(a) == repr(b))  # -0.0 != 0.0
                   for a, b in zip(have, want, strict=True)), \
            f"the fast path's row differs from the contract's: {have!r} != {want!r}"


def bundle(data: bytes) -> None:
    """The hub's decoder, the device's check (signature first, then manifest and digest), the manifest's
    preprocessing parameters (read by the runner: ValueError is its documented refusal), round trips."""
    _message(c.decode_bundle)(data)
    got = _checked(data, check_bundle)
    if got is None:
        return
    assert hashlib.sha256(got.model).hexdigest() == got.manifest.sha256, "a bundle accepted with a wrong digest"
    assert check_bundle(got.encode(), trusted_key=None, allow_unsigned=True) == got
    try:
        params = PreprocessParams.from_dict(got.manifest.preprocess)
    except ValueError:
        return
    assert PreprocessParams.from_dict(params.to_dict()) == params


def announcement(data: bytes) -> None:
    _message(cr.decode_announcement)(data)
    got = _checked(data, check_round)
    if got is not None:
        assert equivalent(check_round(got.encode(), trusted_key=None, allow_unsigned=True), got)


def manifest(data: bytes) -> None:
    """Any JSON as a manifest (what a bundle's header holds once its signature is checked)."""
    try:  # read as a bundle's header is read: the same size and depth bounds
        m = c.manifest_from_obj(c.split_bundle(b"EMLB" + struct.pack(">I", len(data)) + data)[0])
    except c.ContractError:
        return
    assert c.manifest_from_obj(m.to_obj()) == m


# --------------------------------------------------------------------------- logs

Row = tuple[Any, ...]


def _rows(chunks: list[Any]) -> list[Row]:
    """(line, ts, device, values, label) of every row; NaN values as None so rows compare equal."""
    out: list[Row] = []
    for ch in chunks:
        names = np.array(ch.device_names, dtype=object)[ch.device_codes] if len(ch) else []
        labels = ch.labels.tolist() if ch.labels is not None else [None] * len(ch)
        for i in range(len(ch)):
            vals = tuple(None if math.isnan(v) else v for v in ch.values[i].tolist())
            out.append((int(ch.lines[i]), float(ch.ts[i]), names[i], vals, labels[i]))
    return out


def _parse(fmt: str, pieces: list[bytes], on_error: str, chunk_rows: int = 8192,
           ) -> tuple[list[Row], LogError | None, LineParser]:
    """Rows of ``pieces`` fed one after the other, and the error that stopped them (raise mode, or a header)."""
    p = LineParser("fuzz", fmt, on_error=on_error, chunk_rows=chunk_rows)
    chunks: list[Any] = []
    try:
        for piece in pieces:
            chunks.extend(p.feed(piece, flush=False))
        chunks.extend(p.feed(final=True))
    except LogError as exc:
        return _rows(chunks), exc, p
    return _rows(chunks), None, p


def _cuts(data: bytes) -> list[bytes]:
    """``data`` cut at places drawn from its own hash (a fixed, reproducible chunking per input)."""
    seed = hashlib.blake2b(data, digest_size=8).digest()
    points = sorted({b * len(data) // 256 for b in seed})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _as_jsonl(rows: list[Row], channels: tuple[str, ...], labelled: bool) -> bytes:
    """Rows written back as JSON Lines (the round trip of a log)."""
    out = []
    for _, ts, dev, vals, label in rows:
        rec = {"ts": ts, "device_id": dev, **dict(zip(channels, vals, strict=True))}
        if labelled:
            rec["label"] = label
        out.append(orjson.dumps(rec))
    return b"".join(x + b"\n" for x in out)


def _errors(p: LineParser) -> list[str]:
    return [str(e) for e in p.stats.first_errors]


def _log(fmt: str, poison: bytes) -> Target:
    def target(data: bytes) -> None:
        whole, err, p = _parse(fmt, [data], "skip")
        if err is not None:  # only the schema line (header, first record) stops a skipping reader
            assert err.line <= max(1, data.count(b"\n") + 1), err
            return
        # the same bytes in pieces and small chunks: the same rows, the same problems
        pieces, _, q = _parse(fmt, _cuts(data), "skip", chunk_rows=5)
        assert pieces == whole, "chunking changed the rows"
        assert _errors(q) == _errors(p), "chunking changed the problems"
        # raise mode: the rows before the first problem, then that problem
        first = p.stats.first_errors[0] if p.stats.first_errors else None
        before, raised, _ = _parse(fmt, [data], "raise")
        assert str(raised) == str(first), (raised, first)
        assert before == [r for r in whole if first is None or r[0] < first.line]
        if not p.ready:
            return
        # a line the fast path cannot take sends the whole block down the line-by-line rules
        tail = data if data.endswith(b"\n") or not data else data + b"\n"
        slow, _, s = _parse(fmt, [tail + poison], "skip")
        assert slow == whole, "the line-by-line path disagrees with the vectorized one"
        assert _errors(s)[:len(_errors(p))] == _errors(p), "the line-by-line path names other problems"
        # round trip: the rows written as JSON Lines read back the same
        chans, labelled = p.channels or (), bool(p.has_labels)
        again, err2, _ = _parse("jsonl", [_as_jsonl(whole, chans, labelled)], "raise")
        assert err2 is None or not whole, err2
        assert [r[1:] for r in again] == [r[1:] for r in whole], "rows written as JSON Lines read back different"
    return target


def _gunzip_whole(raw: bytes) -> bytes:
    """The reference: the whole file at once, member after member, NUL padding after the last allowed
    (zlib, strict as RFC 1952 asks: reserved header flags are an error, where Python's gzip ignores them)."""
    out = []
    while raw:
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out.append(z.decompress(raw))
        if not z.eof:
            raise EOFError("truncated")
        raw = z.unused_data if z.unused_data.strip(b"\0") else b""
    return b"".join(out)


def log_gz(data: bytes) -> None:
    """A .gz log: ``data`` as the file (mode byte even), or valid CSV gzipped and cut short (odd): rows
    then the LogError that names the line where it breaks, never another error, never lost rows."""
    mode, rest = (data[0], data[1:]) if data else (0, b"")
    path = _SCRATCH / "log.csv.gz"
    if mode % 2:
        full = gzip.compress(rest, mtime=0)
        path.write_bytes(full[: len(full) * (mode // 2) // 128])
    else:
        path.write_bytes(rest)
    chunks: list[Any] = []
    broke: LogError | None = None
    try:
        chunks.extend(read_log(path, chunk_rows=3, on_error="skip"))
    except LogError as exc:
        broke = exc
    try:
        plain = _gunzip_whole(path.read_bytes())
    except (EOFError, zlib.error):  # not gzip, or cut short: read_log had to say so
        assert broke is not None, "a broken .gz read without an error"
        return
    expect, err, ref_parser = _parse("csv", [plain], "skip")
    if not ref_parser.ready:  # no header line at all: read_log refuses the file
        assert broke is not None and broke.reason.startswith("empty file"), broke
    elif err is None:
        assert broke is None, broke
        assert _rows(chunks) == expect, "the gunzip lost or changed rows"


# --------------------------------------------------------------------------- settings


def _toml(value: Any) -> str:
    """One setting's value written as TOML (strings as JSON strings, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return orjson.dumps(str(value)).decode()


def settings(data: bytes) -> None:
    """A config file (``data`` as it is) for the agent: a SettingsError or settings that, written back
    as TOML, load again to the same settings."""
    path = _SCRATCH / "agent.toml"
    path.write_bytes(data)
    try:
        got = load_settings(AgentSettings, env_prefix="FUZZ", config=path, environ={})
    except SettingsError:
        return
    default = AgentSettings()
    kept = {f.name: getattr(got, f.name) for f in dataclasses.fields(got)
            if getattr(got, f.name) is not None and getattr(got, f.name) != getattr(default, f.name)}
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in kept.items()), encoding="utf-8")
    again = load_settings(AgentSettings, env_prefix="FUZZ", config=path, environ={})
    assert repr(again) == repr(got), (got, again)  # repr: a NaN setting equals itself


# --------------------------------------------------------------------------- secure rounds


def secure_step(data: bytes) -> None:
    """A hub's step as a device reads it: signature first (no key, unsigned allowed), then the decoder; round trip."""
    _message(sr.decode_step)(data)
    try:
        got = check_step(data, "d1", trusted_key=None, allow_unsigned=True)
    except BundleRejected:
        return
    assert check_step(got.encode(), "d1", trusted_key=None, allow_unsigned=True) == got


def secure_answer(data: bytes) -> None:
    """A device's secure answer as the hub reads it; a masked one's vectors unpack to their stated sizes."""
    _message(sr.decode_answer)(data)
    try:
        got = sr.decode_answer(data)
    except c.ContractError:
        return
    if got.step == "masked":
        delta, stats = got.vectors()
        assert len(secagg.unpack(delta, got.size, got.bits)) == got.size
        assert len(secagg.unpack(stats, got.stats, sr.STATS_BITS)) == got.stats


# --------------------------------------------------------------------------- the hub's HTTP door


def http(data: bytes) -> None:
    """``data`` as one connection's bytes to ``serve --http`` (fuzz/http_door.py, imported on first use:
    the hub's packages are heavy and only this target needs them)."""
    from fuzz import http_door

    http_door.target(data, _SCRATCH)


TARGETS: dict[str, Target] = {
    "results": results,
    "status": _message(c.decode_status),
    "receipt": _message(c.decode_receipt),
    "update": _message(cu.decode_update),
    "announcement": announcement,
    "bundle": bundle,
    "manifest": manifest,
    "log_csv": _log("csv", b'"\n'),
    "log_jsonl": _log("jsonl", b"x\n"),
    "log_gz": log_gz,
    "settings": settings,
    "secure_step": secure_step,
    "secure_answer": secure_answer,
    "answered": _message(decode_answer_receipt),
    "http": http,
}
