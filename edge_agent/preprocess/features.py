"""Features: normalization statistics and the feature vector of every window; sums over blocks of
readings are computed once and shared by the overlapping windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_agent.preprocess.params import PERCENTILES, PreprocessParams, fft_bins, trend_lags
from edge_agent.preprocess.windows import WindowBatch


def fit_normalization(values: np.ndarray, params: PreprocessParams | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of training values, ignoring NaN/inf.

    ``values`` is ``[n, c]`` readings or ``[k, size, c]`` windows; with ``params``, their absent
    value is replaced first (:func:`replace_absent`), as :func:`extract_features` does, and absurd readings are left
    out (:data:`FIT_ABSURD`).  A channel with (near) zero spread gets std 1.0.  Returns tuples ready for
    ``PreprocessParams.with_normalization``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2:
        raise ValueError("values must be [n, c] or [k, size, c]")
    v = v.reshape(-1, v.shape[-1])
    if params is not None:
        v = replace_absent(v, params)
    v = np.where(np.isfinite(v), v, np.nan)
    if v.shape[0] == 0 or np.all(np.isnan(v), axis=0).any():
        raise ValueError("every channel needs at least one finite value")
    v = _without_absurd(v)
    mean = np.nanmean(v, axis=0)
    std = np.nanstd(v, axis=0)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


FIT_ABSURD = 1e6
"""Readings further than this many times a channel's typical spread from its median are left out of the
normalization statistics (:func:`fit_normalization`): one dead register's 4294967295 among readings of +-2 made a
channel's std 2.9e8, every real reading ~0 after normalization, and itself in range at inference. Left out, its
windows are out of range (:data:`MAX_NORMALIZED`): dropped and said, in training as on the device."""


FIT_ABSURD_SHARE = 0.01
"""... and only when they are rare: at most this share of the channel's readings (the review's catch: a vacuum
chamber's 8 % of readings vented at 1000 mbar, 1e9 spreads from the pumped-down cluster, are real)."""


def _without_absurd(v: np.ndarray) -> np.ndarray:
    """``v`` (float64 [n, c], NaN for no reading) with readings over :data:`FIT_ABSURD` spreads from their channel's
    median as NaN, where they are at most :data:`FIT_ABSURD_SHARE` of the channel's readings. The spread is the
    90th percentile of the distances to the median (the 99th where that is 0: a channel at one value nine times in
    ten); a channel at one value 99 times in 100 keeps every reading. Data without such a reading comes back
    unchanged."""
    med = np.nanmedian(v, axis=0)
    dist = np.abs(v - med)
    q90, q99 = np.nanpercentile(dist, [90.0, 99.0], axis=0)
    spread = np.where(q90 > 0, q90, q99)
    absurd = (dist > FIT_ABSURD * spread) & (spread > 0)
    rare = absurd.sum(axis=0) <= FIT_ABSURD_SHARE * np.isfinite(v).sum(axis=0)
    absurd &= rare
    return np.where(absurd, np.nan, v) if absurd.any() else v


def replace_absent(values: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """``values`` with every reading equal to ``params.absent_value`` replaced by ``absent_as``
    (the same array when there is no absent value)."""
    if params.absent_value is None:
        return values
    return np.where(values == np.float32(params.absent_value), values.dtype.type(params.absent_as), values)


def last_readings(features: np.ndarray, params: PreprocessParams) -> np.ndarray | None:
    """The windows' last readings, in the readings' units, read back from ``"trend-v1"`` feature rows
    (float32 [k, channels], ``last * std + mean`` in float32 as a forecast's ONNX graph computes it);
    None for a feature set that does not keep them."""
    if params.features != "trend-v1" or not params.is_fitted:
        return None
    c = len(params.channels)
    x = np.asarray(features, np.float32)[:, :c]  # the "{channel}_last" columns come first
    return x * np.asarray(params.norm_std, np.float32) + np.asarray(params.norm_mean, np.float32)


def extract_features(windows: np.ndarray | WindowBatch, params: PreprocessParams) -> np.ndarray:
    """Feature vectors of windows, vectorized over windows.

    Args:
        windows: a :class:`WindowBatch`, or float32[k, size, c] raw windows
            (``WindowBatch.data``).  Both give the same features; a batch is
            faster (its overlapping windows share their readings' statistics).
        params: fitted params (``norm_mean``/``norm_std`` set).

    Returns:
        float32[k, params.n_features], a row of NaN for a window that covers a reading out of range
        (:data:`MAX_NORMALIZED`).  Each channel is first normalized with
        the shipped statistics, then (column order = :func:`feature_names`):

        * per channel: mean, std, min, max, 10/25/50/75/90th percentiles,
          RMS, mean absolute first difference, skewness, kurtosis (excess),
          mean-crossing rate;
        * Pearson correlation of every channel pair;
        * ``"stats-fft-v1"`` only, per channel, from the rFFT of the
          mean-removed, Hann-tapered window: dominant frequency (Hz),
          spectral centroid (Hz), normalized spectral entropy, log energy;
          then ``log(1 + 10 |X_f| / size)`` for every rFFT bin ``f`` from
          ``df = rate / size`` up to ``fft_max_hz`` (DC excluded).

        ``"stats-v1"`` is the first two groups only (time domain); on the
        watch exercise data it generalizes better to unseen subjects (the
        spectrum mostly encodes each person's repetition tempo).
        ``"mean-v1"`` is the per-channel mean only (signal-strength scans).
        ``"trend-v1"`` (forecasts): per channel the last reading, the readings
        before it less the last one, the least-squares slope per sample and the
        window mean less the last reading (:func:`_trend_features`).
        Readings equal to ``params.absent_value`` count as ``absent_as``.
    """
    if not params.is_fitted:
        raise ValueError("params have no normalization statistics: use fit_normalization() first")
    size, c = params.window_size, len(params.channels)
    if isinstance(windows, WindowBatch):
        if windows.size != size or windows.values.ndim != 2 or windows.values.shape[1] != c:
            raise ValueError(f"windows of {windows.size} samples x {windows.values.shape[1:]} channels "
                             f"do not match params ({size} samples, {c} channels)")
        values, offsets = windows.values, windows.offsets
    else:
        w = np.asarray(windows, dtype=np.float32)
        if w.ndim != 3 or w.shape[1:] != (size, c):
            raise ValueError(f"windows must have shape (k, {size}, {c}), got {w.shape}")
        values, offsets = w.reshape(-1, c), np.arange(w.shape[0], dtype=np.intp) * size
    return _features(values, offsets, params)


# Windows are split into blocks of gcd(window, hop) samples (5 blocks for 2.5 s windows with a 0.5 s
# hop): the moments of each block are computed once, and a window's moments are combined from its
# blocks'. With more blocks than this per window (e.g. a hop of one sample) windows are one block.
_MAX_BLOCKS = 16
MAX_NORMALIZED = 1e8
"""A reading further than this many standard deviations (the model's training statistics) from the training mean
is out of range: the fourth powers of the kurtosis would overflow float32 (from ~1e9 on, over a window), and no
sensor that works reads it (a dead register reads 4294967295, a rail float32's largest). A window that covers one
gets a row of NaN from :func:`extract_features`: callers leave it out and count it."""
FEATURE_SLICE = 128  # windows per pass of the per-window statistics (bounds the temporaries)


def _block_size(params: PreprocessParams) -> int:
    size = params.window_size
    g = math.gcd(size, params.hop_size)
    return g if size // g <= _MAX_BLOCKS else size


def _features(values: np.ndarray, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Features of the windows ``values[o : o + size]`` (raw readings) for ``o`` in ``offsets``."""
    size, c = params.window_size, len(params.channels)
    k = offsets.shape[0]
    if k == 0:
        return np.empty((0, params.n_features), np.float32)
    mean = np.asarray(params.norm_mean, np.float32)[:, None]
    inv = np.float32(1.0) / np.asarray(params.norm_std, np.float32)[:, None]
    # Layout (c, m), C order: every statistic reduces the last, contiguous axis.
    x = np.empty((c, values.shape[0]), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # a reading at float32's largest: inf, dealt with below
        np.subtract(replace_absent(values, params).T, mean, out=x)
        x *= inv
    out_of_range = None
    within = x <= MAX_NORMALIZED  # False for NaN too; two comparisons: no float temporary the size of x
    within &= x >= -MAX_NORMALIZED
    if not within.all():
        # NaN: a reading no window covers (dropped), or one a training copy lost on purpose: the mean, 0, as ever.
        # Out of range (inf too): the windows that cover one are a row of NaN.
        bad = (~within & ~np.isnan(x)).any(axis=0)
        x[~within] = 0.0
        if bad.any():
            covered = np.concatenate(([0], np.cumsum(bad, dtype=np.intp)))
            out_of_range = covered[offsets + size] > covered[offsets]
    feats = _features_of(x, offsets, params)
    if out_of_range is not None and out_of_range.any():
        feats[out_of_range] = np.nan
    return feats


def computed_rows(features: np.ndarray) -> np.ndarray:
    """bool[k]: the rows of :func:`extract_features` it computed (False for a window out of range: a row of NaN)."""
    return ~np.isnan(features).any(axis=1)


def _features_of(x: np.ndarray, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Features of the windows at ``offsets`` of the normalized readings ``x`` (c, m), every one finite and
    within :data:`MAX_NORMALIZED`."""
    size, c = params.window_size, len(params.channels)
    k = offsets.shape[0]
    if params.features == "mean-v1":
        return sliding_window_view(x, size, axis=1)[:, offsets].mean(axis=2, dtype=np.float32).T.copy()
    if params.features == "trend-v1":
        return _trend_features(x, offsets, params)
    g = _block_size(params)
    if np.any(offsets % g):  # windows not on block boundaries: lay the windows out one after the other
        x = sliding_window_view(x, size, axis=1)[:, offsets].reshape(c, k * size)
        offsets = np.arange(k, dtype=np.intp) * size
    out = np.empty((k, params.n_features), np.float32)
    if k <= FEATURE_SLICE or np.any(np.diff(offsets) < 0):
        blocks = _Blocks.of(x, g)
        for i in range(0, k, FEATURE_SLICE):
            out[i : i + FEATURE_SLICE] = _window_features(x, blocks, offsets[i : i + FEATURE_SLICE], params)
        return out
    # The blocks of each slice's readings only (their temporaries bound like the windows'): the readings from
    # the slice's first window to one past its last (the absolute difference that reaches into the next block),
    # so that every block holds the same sums as in the blocks of all readings.
    for i in range(0, k, FEATURE_SLICE):
        part = offsets[i : i + FEATURE_SLICE]
        lo = int(part[0])
        xs = x[:, lo : int(part[-1]) + size + 1]
        out[i : i + FEATURE_SLICE] = _window_features(xs, _Blocks.of(xs, g), part - lo, params)
    return out


def _trend_features(x: np.ndarray, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """``"trend-v1"``'s rows of the windows at ``offsets`` of the normalized readings ``x`` (c, m).

    What a summary of the window loses and a forecast needs: where the series is now (the last
    reading), where it just was (the lags, as differences from now: level-free, so a series that
    drifts past its training range still looks familiar) and where it is heading (the slope).
    """
    size, k = params.window_size, offsets.shape[0]
    lags = trend_lags(params)
    out = np.empty((k, params.n_features), np.float32)
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    for i in range(0, k, FEATURE_SLICE):
        win = sliding_window_view(x, size, axis=1)[:, offsets[i : i + FEATURE_SLICE]]  # (c, k', size), a view
        last = win[:, :, -1]
        parts = [last, *(win[:, :, -1 - j] - last for j in range(1, lags + 1)),
                 (win @ t) / float(t @ t), win.mean(axis=2, dtype=np.float64) - last]
        out[i : i + FEATURE_SLICE] = np.concatenate([p.T for p in parts], axis=1)
    return out


@dataclass(frozen=True)
class _Blocks:
    """Sums over consecutive blocks of ``g`` normalized readings (one row per block).

    Each block's deviations ``d = x - shift`` are taken from its own ``shift`` (its mean rounded to
    float32, so ``d`` is exact in float32): power sums of deviations from a nearby value keep the
    moments of a window exact even for a flat signal far from zero, where power sums of the raw
    values would cancel catastrophically. ``t1``..``t4`` = sums of ``d``, of the outer products
    ``d d^T`` (c x c), of ``d^3`` and of ``d^4``; ``adiff`` = sum of ``|x[i+1] - x[i]|`` over the
    block's readings ``i`` (the last one reaching into the next block) and ``edge`` that last term.
    """

    g: int
    shift: np.ndarray  # (nb, c)
    t1: np.ndarray  # (nb, c)
    t2: np.ndarray  # (nb, c, c)
    t3: np.ndarray  # (nb, c)
    t4: np.ndarray  # (nb, c)
    adiff: np.ndarray  # (nb, c)
    edge: np.ndarray  # (nb, c)

    @classmethod
    def of(cls, x: np.ndarray, g: int) -> _Blocks:
        """Blocks of the normalized readings ``x`` (c, m); a partial last block is left out (but its first
        reading is the one the last block's ``edge`` reaches: the blocks of a stretch of ``x`` and one reading
        more hold the same sums as those of all of ``x``).

        The sums are float32 like the readings (the precision of a float32 window statistic) and
        are combined in float64.
        """
        c, nb = x.shape[0], x.shape[1] // g
        n = nb * g
        xb = x[:, :n].reshape(c, nb, g)
        shift = xb.mean(axis=2, dtype=np.float32)
        d = xb - shift[:, :, None]
        d2 = d * d
        dt = d.transpose(1, 0, 2)  # (nb, c, g)
        ad = np.zeros((c, n), np.float32)
        reach = min(x.shape[1], n + 1)  # the last block's difference reaches into the partial block, if any
        np.abs(np.diff(x[:, :reach], axis=1), out=ad[:, : reach - 1])
        f64 = np.float64
        return cls(
            g=g,
            shift=shift.T.astype(f64),
            t1=d.sum(axis=2, dtype=f64).T,
            t2=np.matmul(dt, dt.transpose(0, 2, 1)).astype(f64),
            t3=np.einsum("cbg,cbg->bc", d2, d).astype(f64),
            t4=np.einsum("cbg,cbg->bc", d2, d2).astype(f64),
            adiff=ad.reshape(c, nb, g).sum(axis=2).T.astype(f64),
            edge=ad[:, g - 1 :: g].T.astype(f64),
        )


def _window_features(x: np.ndarray, blocks: _Blocks, offsets: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Feature rows of the windows at ``offsets`` of the normalized readings ``x`` (c, m)."""
    size, c = params.window_size, len(params.channels)
    m = _window_moments(blocks, offsets, size)
    sd_eps = m.sd + 1e-6
    skew = m.m3 / sd_eps**3
    kurt = m.m4 / sd_eps**4 - 3.0
    # The readings of each window, (k, c, size) (a copy): crossing rate, order statistics, spectrum.
    win = sliding_window_view(x, size, axis=1)[:, offsets].transpose(1, 0, 2)
    mu32 = m.mean.astype(np.float32)[:, :, None]
    above = win >= mu32
    zcr = np.count_nonzero(above[:, :, 1:] != above[:, :, :-1], axis=2) / np.float32(size - 1)
    spectral = _spectral_features(win - mu32, params) if params.features == "stats-fft-v1" else []
    win.sort(axis=2)
    pos = np.asarray(PERCENTILES, np.float64) / 100.0 * (size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = (pos - lo).astype(np.float32)
    pct = win[:, :, lo] + (win[:, :, hi] - win[:, :, lo]) * frac  # (k, c, p), numpy's "linear" method
    feats = [m.mean, m.sd, win[:, :, 0], win[:, :, -1], *pct.transpose(2, 0, 1), m.rms, m.mad, skew, kurt, zcr]
    iu, ju = np.triu_indices(c, k=1)
    if iu.size:
        feats.append(np.clip(m.cov[:, iu, ju] / (sd_eps[:, iu] * sd_eps[:, ju]), -1.0, 1.0))
    return np.concatenate(feats + spectral, axis=1, dtype=np.float32)


@dataclass(frozen=True)
class _Moments:
    mean: np.ndarray  # (k, c)
    sd: np.ndarray  # (k, c), population standard deviation
    cov: np.ndarray  # (k, c, c), population covariance
    m3: np.ndarray  # (k, c), third central moment
    m4: np.ndarray  # (k, c), fourth central moment
    rms: np.ndarray  # (k, c)
    mad: np.ndarray  # (k, c), mean absolute first difference


def _window_moments(blocks: _Blocks, offsets: np.ndarray, size: int) -> _Moments:
    """Moments of windows from the sums of their blocks, each moved from the block's shift to the
    window mean by the binomial expansion (as in the pairwise updates of Chan, Golub and LeVeque,
    and of Pébay for the third and fourth moments)."""
    g = blocks.g
    idx = (offsets // g)[None, :] + np.arange(size // g)[:, None]  # (K, k): each window's K blocks
    shift, t1 = blocks.shift[idx], blocks.t1[idx]  # (K, k, c)
    mean = (g * shift + t1).sum(axis=0) / size
    delta = shift - mean  # each block's shift from the window mean
    delta2 = delta * delta
    t2 = blocks.t2[idx]  # (K, k, c, c)
    t2d = np.diagonal(t2, axis1=2, axis2=3)  # (K, k, c)
    t3 = blocks.t3[idx]
    half = np.einsum("Kki,Kkj->kij", delta, t1 + 0.5 * g * delta)  # cov's terms in delta, half of them
    cov = t2.sum(axis=0) + half + half.transpose(0, 2, 1)
    m3 = (t3 + 3.0 * delta * t2d + 3.0 * delta2 * t1 + g * delta2 * delta).sum(axis=0)
    m4 = (blocks.t4[idx] + 4.0 * delta * t3 + 6.0 * delta2 * t2d + 4.0 * delta2 * delta * t1
          + g * delta2 * delta2).sum(axis=0)
    sq = (t2d + 2.0 * shift * t1 + g * shift * shift).sum(axis=0)
    mad = (blocks.adiff[idx].sum(axis=0) - blocks.edge[idx[-1]]) / (size - 1)
    cov /= size
    return _Moments(mean=mean, sd=np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0)), cov=cov,
                    m3=m3 / size, m4=m4 / size, rms=np.sqrt(np.maximum(sq, 0.0) / size), mad=mad)


def _spectral_features(xc: np.ndarray, params: PreprocessParams) -> list[np.ndarray]:
    """``"stats-fft-v1"``'s spectral features of mean-removed windows ``xc`` (k, c, size)."""
    size, k, c = params.window_size, xc.shape[0], xc.shape[1]
    eps = np.float32(1e-6)
    taper = np.hanning(size).astype(np.float32)
    mag = np.abs(np.fft.rfft(xc * taper, axis=2)).astype(np.float32) / size  # (k, c, nf)
    freqs = np.fft.rfftfreq(size, d=1.0 / params.sample_rate_hz).astype(np.float32)
    ac = mag[:, :, 1:]  # drop DC
    power = ac * ac
    ptot = power.sum(axis=2) + eps
    dom = freqs[1:][np.argmax(ac, axis=2)]
    centroid = (power * freqs[1:]).sum(axis=2) / ptot
    p = power / ptot[:, :, None]
    ent = -(p * np.log(p + 1e-12)).sum(axis=2) / np.float32(math.log(max(ac.shape[2], 2)))
    nb = fft_bins(params)
    return [dom, centroid, ent, np.log(ptot), np.log1p(ac[:, :, :nb] * 10.0).reshape(k, c * nb)]
