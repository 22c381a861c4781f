"""Shared sensor preprocessing: windowing, missing-data policy and features.

This module is used unchanged by the edge device agent (streaming, one
device's readings arrive in small chunks) and by the cloud hub trainer
(batch, whole recordings), so the model sees exactly the same windows and
features at training and at serving time (no train/serve skew).

Everything here is pure numpy: no I/O, no clocks, no global state, and no
Python loop per reading (there is at most a loop per contiguous segment or per
pushed chunk).

Pipeline
--------
1. ``Windower.push`` / ``make_windows`` cut the stream of readings into
   fixed-size windows that never span a gap, and apply the missing-data
   policy.  Windows hold the *raw* channel values (float32, NaNs filled in);
   they are **not** normalized.  A :class:`WindowBatch` keeps its windows as
   offsets into the readings they share (``DeviceWindowers`` does this per
   device for the agent and the trainer alike).
2. ``extract_features`` normalizes every channel with the statistics shipped
   in :class:`PreprocessParams` (``norm_mean`` / ``norm_std``, fitted once at
   training time with :func:`fit_normalization`) and computes the feature
   vector of each window; sums over blocks of readings are computed once and
   shared by the overlapping windows.

Windowing rules
---------------
* ``size = round(window_s * sample_rate_hz)`` samples,
  ``hop = round(hop_s * sample_rate_hz)`` samples.
* A *gap* is a jump between consecutive timestamps larger than
  ``1.5 / sample_rate_hz`` seconds.  A timestamp that does not increase
  (repeated or going backwards, e.g. a device clock reset) also breaks the
  stream.  The stream is thereby cut into contiguous *segments*.  A segment
  that a gap ends before it filled one window counts one window **dropped**
  in ``WindowBatch.dropped`` (a sensor that pauses more often than a window
  lasts gives readings and no windows, and says so); the last readings of a
  longer segment, too few for another window, are not counted (a recording
  ends when it ends).
* Within each segment windows start at the segment's first sample and every
  ``hop`` samples after it; a window is emitted only when all its ``size``
  samples have arrived.  No window spans a gap.
* A window's ``start`` is the timestamp of its first sample, ``end`` the
  timestamp of its last sample.
* A window whose readings span less than ``MIN_SPAN`` (0.75) of
  ``(size - 1) / sample_rate_hz`` came from a sensor reporting faster than the
  model's rate (a 2 s window of a 1 kHz burst lasts 0.1 s): it is **dropped**
  and counted in ``WindowBatch.dropped``, like a window of missing readings
  (not with ``"mean-v1"`` features: window means of scans, which come when
  they come).

Missing-data policy (``PreprocessParams.missing``)
---------------------------------------------------
A reading is *missing* in a channel when its value is NaN (or +-inf).

* ``"interpolate"`` (default): a window is **dropped** (and counted in
  ``WindowBatch.dropped``) when, in any channel, more than
  ``max_missing_frac * size`` of its samples are missing (so a channel that is
  entirely missing always drops the window).  In every kept window each
  missing value is filled by linear interpolation (over the sample index)
  between the nearest valid samples of that channel *inside the same window*;
  missing values before the first / after the last valid sample are set to
  that nearest valid value.  Samples outside the window are never used, so
  the result does not depend on how the stream was chunked.
* ``"drop"``: any window that has a missing value is dropped and counted.

Window labels
-------------
When labels are given (one per reading), each window gets one label:

* float labels (regression targets, ``[n]`` or ``[n, outputs]``): the mean over
  the window's readings, per output;
  with ``PreprocessParams.forecast`` set, the label of the window's last
  reading instead (what the readings up to it are to predict, e.g. the
  reading an hour later);
* any other labels (text, int, bool, object): the majority label of the
  window's readings; ties go to the tied label seen most recently.  Labels
  are compared by value (object arrays mixing types, e.g. str and None, are
  compared by their ``str``).
"""

from edge_agent.preprocess.features import extract_features, fit_normalization, last_readings, replace_absent
from edge_agent.preprocess.params import (
    FEATURE_SETS,
    MISSING_POLICIES,
    InvalidParams,
    PreprocessParams,
    feature_names,
)
from edge_agent.preprocess.windows import DeviceWindowers, WindowBatch, Windower, make_windows

__all__ = [
    "FEATURE_SETS",
    "MISSING_POLICIES",
    "InvalidParams",
    "PreprocessParams",
    "WindowBatch",
    "Windower",
    "DeviceWindowers",
    "make_windows",
    "extract_features",
    "feature_names",
    "fit_normalization",
    "last_readings",
    "replace_absent",
]
