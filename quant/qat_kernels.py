"""The per-step QAT arithmetic as compiled CPU loops (numba), bit for bit the torch ops it replaces on CPU.

At the batch sizes the jobs train with (128), QAT's cost per step is not arithmetic but the dispatch of the
twenty-odd small torch ops of each fake-quant (MLP weights: about ten per layer; the embedding correction: about
twenty-five per TBE). Each kernel here is one call doing the same operations in the same order in float32, so it
gives the same bits (``tests/quant/test_qat_kernels.py`` compares them); the torch versions stay for other devices
and the less common cases. No library has these kernels, so they are written here.

numba caches the compiled loops in ``__pycache__`` (``cache=True``) under this file's name and date, and the
cache refers to the module by its import name: a cache written while it had another name (``quant.qat_kernels`` before
the package installed as ``dqrm``) fails to load, so an edit of this file, which renews its date, renews the cache.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _prefetch(typingctx, array, index):  # pragma: no cover - compiled
    """A read prefetch (LLVM's ``llvm.prefetch``, into every cache level) of ``array[index]`` of a 1-D array: no
    load, no fault on any address. numba has none of its own, so it is written here."""
    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [args[1]], wraparound=False, boundscheck=False)
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        read, all_levels, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), read, all_levels, data])
        return context.get_dummy_value()
    return types.void(array, index), codegen


PREFETCH_AHEAD = 16
"""How many ids ahead ``embedding_correction`` prefetches the row: a large table's rows are random reads that miss
the caches, and the loop's work per id is too long for the CPU to run that far ahead on its own (measured in a
training step at batch 2048, 1e6 rows a table: the kernel 1.73 -> 1.38 ms)."""


@njit(cache=True, nogil=True, inline="always")
def _abs_max_pattern(row):  # pragma: no cover - compiled
    """max |x| over a row of float32 bit patterns (int32): the patterns without their sign bit, whose integer order
    is float order (a NaN, as in ``amax``, wins). The compiler vectorizes this where a float max chain would wait on
    each comparison."""
    m = np.int32(0)
    for c in range(row.shape[0]):
        v = row[c] & np.int32(0x7FFFFFFF)
        m = v if v > m else m
    return m


@njit(cache=True, nogil=True, inline="always")
def _fake_quant_row(row, dst, maximum, inv_qmax, qmin, qmax, tiny):  # pragma: no cover - compiled
    """``dst = clamp(rint(row * (1 / s)), qmin, qmax) * s`` with ``s = max(maximum * inv_qmax, tiny)``."""
    s = maximum * inv_qmax
    s = tiny if s < tiny else s
    inv = np.float32(1) / s
    for c in range(row.shape[0]):
        q = np.rint(row[c] * inv)
        q = qmin if q < qmin else q
        q = qmax if q > qmax else q
        dst[c] = q * s


@njit(cache=True, nogil=True)
def mlp_fake_quant(w, out, inv_qmax, qmin, qmax, tiny):  # pragma: no cover - compiled
    """``out = clamp(rint(w * (1 / s)), qmin, qmax) * s`` per row, ``s = max(max|row| * inv_qmax, tiny)``: the
    arithmetic of ``quant.mlp_qat.row_scales``/``row_codes`` (a 2-D float32 ``w``, C-contiguous); row maxima on
    the bit patterns (``_abs_max_pattern``)."""
    rows = w.shape[0]
    patterns = w.view(np.int32)
    bits = np.empty(rows, dtype=np.int32)
    for r in range(rows):
        bits[r] = _abs_max_pattern(patterns[r])
    maxima = bits.view(np.float32)
    for r in range(rows):
        _fake_quant_row(w[r], out[r], maxima[r], inv_qmax, qmin, qmax, tiny)


@njit(cache=True, nogil=True)
def mlp_fake_quant_flat(flat, layers, inv_qmax, qmin, qmax, tiny):  # pragma: no cover - compiled
    """``mlp_fake_quant`` in place on several matrices laid end to end in the 1-D ``flat``: ``layers[i] =
    (offset, rows, cols)``. One call for every MLP layer of a model (per call, the dispatch costs more than the
    arithmetic). Rows are 1-D slices of ``flat`` (a reshaped 2-D view is not known to be contiguous, and the
    compiler then leaves the loops scalar)."""
    patterns = flat.view(np.int32)
    bits = np.empty(np.max(layers[:, 1]), dtype=np.int32)
    maxima = bits.view(np.float32)
    for i in range(layers.shape[0]):
        start, rows, cols = layers[i, 0], layers[i, 1], layers[i, 2]
        for r in range(rows):
            a = start + r * cols
            bits[r] = _abs_max_pattern(patterns[a:a + cols])
        for r in range(rows):
            a = start + r * cols
            row = flat[a:a + cols]
            _fake_quant_row(row, row, maxima[r], inv_qmax, qmin, qmax, tiny)


@njit(cache=True, nogil=True)
def embedding_correction(indices, offsets, rows, first_row, grid, weights, seen, out):  # pragma: no cover
    """``out[s, f*d:(f+1)*d] += sum over the bag (f, s) of (FQ(w) - w) * weight`` (the bag's sum first, then one
    add: the bits of ``out + pooled``) for a TBE of width ``d`` with feature-major bags, FBGEMM's arithmetic per
    element: ``code = min(max(rint((w - bias) * inv), 0), qmax)``, ``FQ(w) = code * scale + bias``. ``rows`` is the (rows, d) weight view, ``first_row[f]`` the first row of
    feature f's table, ``grid[f] = (bias, 1/scale, scale, qmax)``; ``weights`` (per id) is used and ``seen`` (a
    bitset of rows, bit ``r & 7`` of byte ``r >> 3``) is marked when not empty."""
    features = first_row.shape[0]
    batch = (offsets.shape[0] - 1) // features
    d = rows.shape[1]
    flat = rows.reshape(-1)
    weighted = weights.shape[0] > 0
    mark = seen.shape[0] > 0
    o = np.empty(d, dtype=out.dtype)
    for f in range(features):
        bias, inv, scale, qmax = grid[f, 0], grid[f, 1], grid[f, 2], grid[f, 3]
        base = first_row[f]
        col = f * d
        end = offsets[(f + 1) * batch]
        for s in range(batch):
            for k in range(d):
                o[k] = 0
            for p in range(offsets[f * batch + s], offsets[f * batch + s + 1]):
                if p + PREFETCH_AHEAD < end:
                    _prefetch(flat, (base + indices[p + PREFETCH_AHEAD]) * d)
                r = base + indices[p]
                if mark:
                    seen[r >> 3] |= np.uint8(1 << (r & 7))
                w = rows[r]
                for k in range(d):
                    q = np.rint((w[k] - bias) * inv)
                    q = np.float32(0) if q < 0 else q
                    q = qmax if q > qmax else q
                    v = q * scale + bias - w[k]
                    if weighted:
                        v = v * weights[p]
                    o[k] += v
            dst = out[s, col:col + d]
            for k in range(d):
                dst[k] += o[k]


@njit(cache=True, nogil=True)
def mark_rows(seen, rows):  # pragma: no cover - compiled
    """Set bit ``r & 7`` of ``seen[r >> 3]`` for every row ``r`` (the bitset ``embedding_correction`` marks)."""
    for r in rows:
        seen[r >> 3] |= np.uint8(1 << (r & 7))


BLOCK = 64
"""Rows per block maximum: one 64-bit word of the seen-rows bitset."""


@njit(cache=True, nogil=True)
def refresh_row_maxima(rows, known, seen, blocks):  # pragma: no cover - compiled
    """``known[r] = max |rows[r]|`` for every row whose bit is set in the bitset ``seen`` (then cleared), or for
    every row when ``seen`` is empty (on bit patterns, ``_abs_max_pattern``); ``blocks[b]`` is then the maximum of
    ``known`` over rows ``[64 b, 64 b + 64)``, recomputed only for the blocks holding a refreshed row. ``seen`` is
    a whole number of 64-bit words (bit ``r & 63`` of word ``r >> 6``, little-endian: the same bits as bit ``r & 7``
    of byte ``r >> 3``), scanned a word at a time."""
    patterns = rows.view(np.int32)
    maxima = known.view(np.int32)
    block_bits = blocks.view(np.int32)
    n = rows.shape[0]
    if seen.shape[0] == 0:
        for r in range(n):
            maxima[r] = _abs_max_pattern(patterns[r])
        for b in range(blocks.shape[0]):
            block_bits[b] = _abs_max_pattern(maxima[b * BLOCK:min((b + 1) * BLOCK, n)])
        return
    words = seen.view(np.uint64)
    for b in range(words.shape[0]):
        word = words[b]
        if word == 0:
            continue
        words[b] = 0
        base = b * BLOCK
        for bit in range(BLOCK):
            if (word >> np.uint64(bit)) & np.uint64(1):
                maxima[base + bit] = _abs_max_pattern(patterns[base + bit])
        block_bits[b] = _abs_max_pattern(maxima[base:min(base + BLOCK, n)])


@njit(cache=True, nogil=True)
def table_maxima(known, blocks, starts, counts, out):  # pragma: no cover - compiled
    """``out[t] = max(known[starts[t]:starts[t] + counts[t]])`` (0 for an empty table), from the block maxima for
    the blocks wholly inside the table and from ``known`` for the rows at its two ends (on bit patterns)."""
    maxima = known.view(np.int32)
    block_bits = blocks.view(np.int32)
    result = out.view(np.int32)
    for t in range(starts.shape[0]):
        lo, hi = starts[t], starts[t] + counts[t]
        first, last = (lo + BLOCK - 1) // BLOCK, hi // BLOCK  # the blocks wholly inside [lo, hi)
        if first >= last:
            result[t] = _abs_max_pattern(maxima[lo:hi])
            continue
        m = _abs_max_pattern(block_bits[first:last])
        a = _abs_max_pattern(maxima[lo:first * BLOCK])
        c = _abs_max_pattern(maxima[last * BLOCK:hi])
        m = a if a > m else m
        result[t] = c if c > m else m


@njit(cache=True, nogil=True)
def quantize_pack_rows(w, scale, bias, bits, out):  # pragma: no cover - compiled
    """FBGEMM codes of the rows ``w`` packed into ``out`` (uint8, ``dim * bits / 8`` bytes a row, element 2k in the
    low bits): ``clamp(rint((w - bias) * (1 / scale)), 0, 2^bits - 1)`` per element, with ``scale``/``bias`` per
    row (length ``rows``) or per table (length 1), as ``quant.fake_quant.quantize_codes`` + ``pack_rows`` compute
    them in float32. Export converts whole tables with it: one pass over the rows, where the torch ops make five."""
    rows, dim = w.shape
    per = 8 // bits
    qmax = np.float32((1 << bits) - 1)
    zero = np.float32(0)
    for r in range(rows):
        i = r if scale.shape[0] > 1 else 0
        inv = np.float32(1) / scale[i]
        b = bias[i]
        for k in range(out.shape[1]):
            byte = 0
            for j in range(per):
                c = k * per + j
                if c < dim:
                    q = np.rint((w[r, c] - b) * inv)
                    q = zero if q < zero else q
                    q = qmax if q > qmax else q
                    byte |= int(q) << (j * bits)
            out[r, k] = byte
