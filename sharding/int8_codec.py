"""The INT8 error-feedback codec of ``sharding.comm.Int8ErrorFeedbackHook`` as compiled CPU loops (numba).

The torch version of the codec takes about nine passes over a bucket (add, abs, row maxima, divide, round, cast,
error) plus a few ops per parameter, and on CPU each pass is a full trip through memory: for the Kaggle-shaped
MLP (476k gradients) it cost about as much as the all-reduce it replaces. Here encoding is two passes per row (the
error-fed gradient and its maximum; then codes and the new error) and decoding one, with the same arithmetic
operation for operation, so the result is bit for bit the torch version's (``tests/sharding/test_comm.py`` checks
it); the torch version stays for other devices. No library has this codec, so it is written here.

Segments are rows ``(offset, size, first row, rows)`` of the bucket: a parameter of ``rows`` output rows, each
``size // rows`` long (a bias is one row).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_LANES = 8  # independent running maxima: one chain would wait on each comparison


@njit(cache=True, nogil=True)
def encode(grad, err, x, segments, steps, codes, tiny):  # pragma: no cover - compiled
    """``x = grad + err``; per row ``step = max(max|x| / 127, tiny)``, ``code = rint(x / step)`` (as int8) and
    ``err = x - code * step`` rounded once (float64 holds the product and the difference exactly; torch's addcmul
    gets the same from a fused multiply-add). Returns False (and stops) at a row whose maximum is not finite."""
    for s in range(segments.shape[0]):
        offset, size, first, rows = segments[s, 0], segments[s, 1], segments[s, 2], segments[s, 3]
        width = size // rows
        for r in range(rows):
            lo = offset + r * width
            g, e, xs, cs = grad[lo:lo + width], err[lo:lo + width], x[lo:lo + width], codes[lo:lo + width]
            lanes = np.zeros(_LANES, dtype=np.float32)
            finite = True
            main = width - width % _LANES
            for j in range(0, main, _LANES):
                for k in range(_LANES):
                    v = g[j + k] + e[j + k]
                    xs[j + k] = v
                    a = abs(v)
                    finite &= a <= np.float32(np.inf)  # False for NaN (and inf fails below)
                    lanes[k] = a if a > lanes[k] else lanes[k]
            for j in range(main, width):
                v = g[j] + e[j]
                xs[j] = v
                a = abs(v)
                finite &= a <= np.float32(np.inf)
                lanes[0] = a if a > lanes[0] else lanes[0]
            m = lanes.max()
            if not finite or m == np.float32(np.inf):
                return False
            step = m / np.float32(127)
            if step < tiny:
                step = tiny
            steps[first + r] = step
            step64 = np.float64(step)
            for j in range(width):
                q = np.rint(xs[j] / step)
                cs[j] = np.int8(q)
                e[j] = np.float32(np.float64(xs[j]) - np.float64(q) * step64)  # exact, rounded once (as an FMA)
    return True


@njit(cache=True, nogil=True)
def decode(codes, steps, segments, out):  # pragma: no cover - compiled
    """``out = sum over ranks w of code[w] * (step[w] / world)`` in float32, summed in rank order, each term added
    with one rounding (float64 holds the product exactly and the sum exactly or within 2^-29 of an fp32 tie)."""
    world = codes.shape[0]
    for s in range(segments.shape[0]):
        offset, size, first, rows = segments[s, 0], segments[s, 1], segments[s, 2], segments[s, 3]
        width = size // rows
        for r in range(rows):
            lo = offset + r * width
            o = out[lo:lo + width]
            step = steps[0, first + r] / np.float32(world)
            c = codes[0, lo:lo + width]
            for j in range(width):
                o[j] = np.float32(c[j]) * step
            for w in range(1, world):
                step64 = np.float64(steps[w, first + r] / np.float32(world))
                c = codes[w, lo:lo + width]
                for j in range(width):  # rounded once, as torch's addcmul_ (a fused multiply-add) does
                    o[j] = np.float32(np.float64(o[j]) + np.float64(c[j]) * step64)
