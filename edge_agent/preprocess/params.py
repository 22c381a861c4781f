"""Preprocessing parameters: what a model was trained with, shipped in its manifest."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING_POLICIES = ("interpolate", "drop")

#: Supported feature sets.  The name is versioned: changing what a feature set
#: computes requires a new name, because trained models depend on it.
FEATURE_SETS = ("stats-fft-v1", "stats-v1", "mean-v1", "trend-v1")

# Percentiles used by the time-domain statistics.
PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)
_STAT_NAMES = (
    "mean",
    "std",
    "min",
    "max",
    *(f"p{int(p)}" for p in PERCENTILES),
    "rms",
    "mad_diff",  # mean absolute first difference (jerkiness)
    "skew",
    "kurt",
    "zcr",  # zero (mean) crossing rate, crossings per sample
)
_SPEC_NAMES = ("dom_freq", "centroid", "entropy", "log_energy")
# "trend-v1" keeps what a summary loses for a forecast: the last reading, the readings just before it
# (as differences from it), the slope and the mean of the window (bench/forecast.py chose 3 lags).
TREND_LAGS = 3

# Sane bounds: parameters arrive in signed manifests, but a value past these would overflow an integer
# (a rate or hop of 1e308), or stall a device for seconds and gigabytes (a 1e5 s window: 9.4 s, 1.2 GB
# just naming its features). The largest real uses are far below: 50 Hz x 6 channels x 2 s windows for
# the watch, 520 Wi-Fi channels x 1-3 scans for positioning.
MAX_RATE_HZ = 1e6
MAX_WINDOW_SAMPLES = 1 << 16  # also the most a hop may span
MAX_CHANNELS = 1024
MAX_WINDOW_VALUES = 1 << 20  # samples x channels of one window (4 MB as float32)



class InvalidParams(ValueError):
    """Preprocessing parameters that cannot work, each ``problem`` said (a log's rate against the windows)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid PreprocessParams: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PreprocessParams:
    """Everything needed to turn raw readings into model inputs.

    The instance travels as JSON (``to_dict`` / ``from_dict``) inside the
    model manifest, so a device preprocesses exactly as the trainer did.

    Attributes:
        sample_rate_hz: nominal sampling rate of the readings.
        window_s: window length in seconds (``round(window_s*rate)`` samples).
        hop_s: step between window starts in seconds (``round(hop_s*rate)``
            samples).
        channels: names of the value columns, in order.
        missing: missing-data policy, ``"interpolate"`` or ``"drop"`` (see the
            module docstring).
        max_missing_frac: with ``"interpolate"``, windows in which any channel
            has more than this fraction of missing samples are dropped.
        norm_mean, norm_std: per-channel normalization statistics fitted on
            the training data (:func:`fit_normalization`); empty tuples mean
            "not fitted yet" (windowing works, feature extraction refuses).
        features: name/version of the feature set (one of ``FEATURE_SETS``):
            ``"stats-fft-v1"`` (default: time-domain statistics, channel
            correlations and spectral features) or ``"stats-v1"`` (without the
            spectral part: better on the watch exercise data, see
            :func:`extract_features`).
            ``"mean-v1"``: the window mean of each channel only, for scans of
            signal strengths (positioning fingerprints: a window of 1-3 scans).
        fft_max_hz: highest frequency of the rFFT magnitude bins kept per
            channel by ``"stats-fft-v1"`` (``None`` = up to Nyquist).
        absent_value, absent_as: a reading equal to ``absent_value`` means
            "nothing there" rather than "reading missing" (UJIIndoorLoc writes
            +100 for an access point a scan did not hear) and stands for
            ``absent_as`` (e.g. -110 dBm, below the weakest signal heard);
            ``None`` = no such value.  Applied before normalization, at
            training and on the device alike.
            ``"trend-v1"``: per channel the last reading, the ``TREND_LAGS``
            readings before it as differences from it, the least-squares slope
            and the window mean less the last reading (forecasts of a series).
        forecast: a channel whose next readings a regressor forecasts, or
            ``None``.  Then a window's target is the label of its *last*
            reading (e.g. the reading an hour later), not the mean of its
            readings' labels; the model learns the change from the window's
            last reading of that channel and its ONNX graph adds that reading
            back (so every runner gets forecasts); needs ``"trend-v1"``.
    """

    sample_rate_hz: float
    window_s: float
    hop_s: float
    channels: tuple[str, ...]
    missing: str = "interpolate"
    max_missing_frac: float = 0.2
    norm_mean: tuple[float, ...] = ()
    norm_std: tuple[float, ...] = ()
    features: str = "stats-fft-v1"
    fft_max_hz: float | None = None
    absent_value: float | None = None
    absent_as: float | None = None
    forecast: str | None = None

    def __post_init__(self) -> None:
        # Normalize sequence fields to tuples so that equality and hashing
        # work after a JSON round trip (JSON has lists only).
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        object.__setattr__(self, "norm_mean", tuple(float(v) for v in self.norm_mean))
        object.__setattr__(self, "norm_std", tuple(float(v) for v in self.norm_std))
        errors = []
        if not (_finite(self.sample_rate_hz) and 0 < self.sample_rate_hz <= MAX_RATE_HZ):
            errors.append(f"sample_rate_hz must be > 0 and at most {MAX_RATE_HZ:g}, got {self.sample_rate_hz!r}")
        else:
            least = 1 if self.features == "mean-v1" else 2  # a mean needs one reading, a spread two
            window, hop = _samples(self.window_s, self.sample_rate_hz), _samples(self.hop_s, self.sample_rate_hz)
            if window < least:
                errors.append(f"window_s={self.window_s!r} gives fewer than {least} samples per window")
            elif window > MAX_WINDOW_SAMPLES or window * len(self.channels) > MAX_WINDOW_VALUES:
                errors.append(f"window_s={self.window_s!r} gives windows of {window:g} samples x {len(self.channels)} "
                              f"channels, over the limits of {MAX_WINDOW_SAMPLES} samples, {MAX_WINDOW_VALUES} values")
            if hop < 1:
                errors.append(f"hop_s={self.hop_s!r} gives a hop of less than 1 sample")
            elif hop > MAX_WINDOW_SAMPLES:
                errors.append(f"hop_s={self.hop_s!r} gives a hop of {hop:g} samples, over {MAX_WINDOW_SAMPLES}")
        if not self.channels or len(self.channels) > MAX_CHANNELS:
            errors.append(f"channels must be 1 to {MAX_CHANNELS} names, got {len(self.channels)}")
        elif len(set(self.channels)) != len(self.channels):
            errors.append(f"channels must be unique, got {list(self.channels)}")
        if self.missing not in MISSING_POLICIES:
            errors.append(f"missing must be one of {MISSING_POLICIES}, got {self.missing!r}")
        if not (_finite(self.max_missing_frac) and 0.0 <= self.max_missing_frac < 1.0):
            errors.append(f"max_missing_frac must be in [0, 1), got {self.max_missing_frac!r}")
        if self.features not in FEATURE_SETS:
            errors.append(f"features must be one of {FEATURE_SETS}, got {self.features!r}")
        if self.fft_max_hz is not None and not (_finite(self.fft_max_hz) and self.fft_max_hz > 0):
            errors.append(f"fft_max_hz must be > 0 or None, got {self.fft_max_hz!r}")
        if self.forecast is not None and (self.forecast not in self.channels or self.features != "trend-v1"):
            errors.append(f"forecast must name one of the channels {list(self.channels)} and go with features "
                          f"'trend-v1' (the graph adds back its last reading), got {self.forecast!r} with "
                          f"{self.features!r}")
        if (self.absent_value is None) != (self.absent_as is None):
            errors.append("absent_value and absent_as go together (both set or both None)")
        elif self.absent_value is not None and not (_finite(self.absent_value) and _finite(self.absent_as)):
            errors.append(f"absent_value and absent_as must be finite, got {self.absent_value!r}, {self.absent_as!r}")
        if len(self.norm_mean) != len(self.norm_std):
            errors.append("norm_mean and norm_std must have the same length")
        elif self.norm_mean and len(self.norm_mean) != len(self.channels):
            errors.append(
                f"norm_mean/norm_std have {len(self.norm_mean)} values "
                f"but there are {len(self.channels)} channels"
            )
        if not all(_finite(v) for v in self.norm_mean):
            errors.append("norm_mean must be finite")
        if not all(_finite(v) and v > 0 for v in self.norm_std):
            errors.append("norm_std must be finite and > 0")
        if errors:
            raise InvalidParams(errors)

    # -- derived sizes -----------------------------------------------------
    @property
    def window_size(self) -> int:
        """Window length in samples."""
        return int(round(self.window_s * self.sample_rate_hz))

    @property
    def hop_size(self) -> int:
        """Hop between window starts in samples."""
        return int(round(self.hop_s * self.sample_rate_hz))

    @property
    def gap_s(self) -> float:
        """Timestamp jumps larger than this (seconds) are gaps."""
        return 1.5 / self.sample_rate_hz

    @property
    def is_fitted(self) -> bool:
        """True when normalization statistics are present."""
        return len(self.norm_mean) == len(self.channels)

    @property
    def n_features(self) -> int:
        """Length of the feature vector produced by :func:`extract_features`."""
        return len(feature_names(self))

    def with_normalization(self, mean: Sequence[float], std: Sequence[float]) -> PreprocessParams:
        """Copy of these params with the given normalization statistics."""
        return dataclasses.replace(self, norm_mean=tuple(mean), norm_std=tuple(std))

    # -- JSON --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k in ("channels", "norm_mean", "norm_std"):
            d[k] = list(d[k])
        if self.absent_value is None:  # keys added later are left out at their default, so agents that
            del d["absent_value"], d["absent_as"]  # predate them still read every manifest they can serve
        if self.forecast is None:
            del d["forecast"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessParams:
        """Strict inverse of :meth:`to_dict`.

        Raises ValueError on unknown keys, missing required keys, wrong
        types or invalid values (with a message naming the culprit).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"PreprocessParams.from_dict expects a mapping, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in d]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise ValueError(
                "invalid PreprocessParams dict: " + ", ".join(parts) + f" (expected keys: {sorted(fields)})"
            )
        kw: dict[str, Any] = {}
        for name, value in d.items():
            if name in ("sample_rate_hz", "window_s", "hop_s", "max_missing_frac"):
                kw[name] = _as_float(name, value)
            elif name == "forecast" and value is None:
                kw[name] = None
            elif name in ("fft_max_hz", "absent_value", "absent_as"):
                kw[name] = None if value is None else _as_float(name, value)
            elif name in ("missing", "features", "forecast"):
                if not isinstance(value, str):
                    raise ValueError(f"invalid PreprocessParams dict: {name} must be a string, got {value!r}")
                kw[name] = value
            elif name == "channels":
                if (
                    isinstance(value, str)
                    or not isinstance(value, (list, tuple))
                    or not all(isinstance(v, str) for v in value)
                ):
                    raise ValueError(
                        f"invalid PreprocessParams dict: channels must be a list of strings, got {value!r}"
                    )
                kw[name] = tuple(value)
            else:  # norm_mean / norm_std
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ValueError(
                        f"invalid PreprocessParams dict: {name} must be a list of numbers, got {value!r}"
                    )
                kw[name] = tuple(_as_float(name, v) for v in value)
        return cls(**kw)


def _samples(seconds: float, rate: float) -> float:
    """``round(seconds * rate)`` as a float, -1 when not a finite number (no OverflowError for 1e308)."""
    if not _finite(seconds):
        return -1.0
    n = float(seconds) * rate
    return float(round(n)) if math.isfinite(n) else math.inf


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid PreprocessParams dict: {name} must be a number, got {value!r}")
    return float(value)


def fft_bins(params: PreprocessParams) -> int:
    """Number of rFFT magnitude bins kept per channel (DC excluded)."""
    size = params.window_size
    n_rfft = size // 2 + 1
    if params.fft_max_hz is None:
        return n_rfft - 1
    df = params.sample_rate_hz / size
    return int(min(n_rfft - 1, max(1, math.floor(params.fft_max_hz / df + 1e-9))))


def trend_lags(params: PreprocessParams) -> int:
    """Readings before the last one that ``"trend-v1"`` keeps (fewer in a window of fewer readings)."""
    return min(TREND_LAGS, params.window_size - 1)


def feature_names(params: PreprocessParams) -> list[str]:
    """Names of the features, in the column order of :func:`~edge_agent.preprocess.features.extract_features`."""
    ch = params.channels
    if params.features == "mean-v1":
        return [f"{c}_mean" for c in ch]
    if params.features == "trend-v1":
        lags = [f"lag{j}" for j in range(1, trend_lags(params) + 1)]
        return [f"{c}_{s}" for s in ("last", *lags, "slope", "mean_rel") for c in ch]
    names = [f"{c}_{s}" for s in _STAT_NAMES for c in ch]
    names += [f"corr_{ch[i]}_{ch[j]}" for i in range(len(ch)) for j in range(i + 1, len(ch))]
    if params.features == "stats-fft-v1":
        names += [f"{c}_{s}" for s in _SPEC_NAMES for c in ch]
        df = params.sample_rate_hz / params.window_size
        names += [f"{c}_fft_{(b + 1) * df:.2f}Hz" for c in ch for b in range(fft_bins(params))]
    return names
