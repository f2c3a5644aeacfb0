"""The compiled CPU backward of a table-batched embedding with row-wise Adagrad fused in.

One call does, table by table, what FBGEMM's
``split_embedding_backward_codegen_rowwise_adagrad_cpu`` does on its fast path
(float32 weights, one feature per table, sum pooling, no per-id weights):

1. the table's lookups sorted by row, stably (so a row's lookups stay in batch
   order), by an LSD radix sort of 11-bit digits;
2. per row looked up, the gradient: the sum of ``grad[b, D_offset:D_offset+D]``
   over its lookups, in that order, from the first term (FBGEMM's SpMDM sums
   the same way);
3. the row-wise Adagrad step on the row: the mean of the squared gradient
   summed as FBGEMM's AVX2 kernel sums it (eight lanes, lane ``d % 8`` taking
   ``g[d]**2`` in order, then ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``), then
   ``m += mean``, ``w += (-lr / (sqrt(m) + eps)) * g``, all float32, products
   and sums rounded separately (no fused multiply-add).

The weights and the accumulator come out bit for bit as FBGEMM's
(``tests/test_tbe_cpu.py``) on x86 CPUs with AVX2, where FBGEMM runs that AVX2
kernel (on AVX-512 CPUs too; widths are multiples of 4, so the last vector is
whole or half). Elsewhere FBGEMM takes a reference loop, and the sum of squares
may round differently in the last bit. On the multi-hot bench's lookups it is 3.5x
faster, on uniform ids 6x (``python -m benchmarks.tbe_backward``). With uniform
ids FBGEMM's kernel spends about 510 ns on each row it updates, this loop about
85, sort included.
"""

from __future__ import annotations

import numba
import numpy as np

_DIGIT_BITS = 11
_DIGITS = 1 << _DIGIT_BITS


@numba.njit(inline="always")
def _radix_pass(keys, vals, out_keys, out_vals, shift, counts):  # noqa: ANN001, ANN202
    """One stable counting-sort pass of (keys, vals) by the digit at ``shift``."""
    counts[:] = 0
    for i in range(keys.shape[0]):
        counts[(keys[i] >> shift) & (_DIGITS - 1)] += 1
    total = 0
    for digit in range(_DIGITS):
        c = counts[digit]
        counts[digit] = total
        total += c
    for i in range(keys.shape[0]):
        k = keys[i]
        digit = (k >> shift) & (_DIGITS - 1)
        at = counts[digit]
        out_keys[at] = k
        out_vals[at] = vals[i]
        counts[digit] = at + 1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def backward_rowwise_adagrad(  # noqa: ANN201, PLR0913 - numba signature, arrays in and out
    grad,  # float32 [B * total_D], the pooled output's gradient, row-major
    indices,  # int [N], the rows looked up, feature after feature
    offsets,  # int [T * B + 1], bag b of table t is offsets[t*B+b]:offsets[t*B+b+1]
    batch_size,
    d_offsets,  # int [T + 1], table t's columns in a grad row
    weights_offsets,  # int64 [T], table t's first weight in ``weights``
    momentum_offsets,  # int64 [T], table t's first accumulator in ``momentum``
    rows,  # int64 [T], rows per table
    weights,  # float32, every table's rows, flat (updated in place)
    momentum,  # float32, one accumulator per row (updated in place)
    neg_lr,  # float32, -learning rate
    eps,  # float32
    first,  # the tables first .. last - 1 are updated
    last,
):
    """Updates ``weights`` and ``momentum`` for the tables ``first .. last - 1``;
    returns -1, or the first of them with an id outside its rows (nothing of that
    table or later ones is updated). Tables share nothing: ranges of them may be
    updated by several threads at once."""
    stride = grad.shape[0] // batch_size
    counts = np.empty(_DIGITS, np.int64)
    for t in range(first, last):
        lo = offsets[t * batch_size]
        n = offsets[(t + 1) * batch_size] - lo
        if n == 0:
            continue
        col = d_offsets[t]
        dim = d_offsets[t + 1] - col
        keys = np.empty(n, np.int64)
        vals = np.empty(n, np.int64)  # where the lookup's gradient starts in ``grad``
        k = 0
        for b in range(batch_size):
            for i in range(offsets[t * batch_size + b], offsets[t * batch_size + b + 1]):
                row = indices[i]
                if row < 0 or row >= rows[t]:
                    return t
                keys[k] = row
                vals[k] = b * stride + col
                k += 1
        out_keys = np.empty(n, np.int64)
        out_vals = np.empty(n, np.int64)
        shift = 0
        while shift == 0 or (rows[t] - 1) >> shift > 0:
            _radix_pass(keys, vals, out_keys, out_vals, shift, counts)
            keys, out_keys = out_keys, keys
            vals, out_vals = out_vals, vals
            shift += _DIGIT_BITS
        w_base = weights_offsets[t]
        m_base = momentum_offsets[t]
        g = np.empty(dim, np.float32)
        whole = dim - dim % 8
        j = 0
        while j < n:
            row = keys[j]
            g[:] = grad[vals[j] : vals[j] + dim]
            j += 1
            while j < n and keys[j] == row:
                g += grad[vals[j] : vals[j] + dim]
                j += 1
            l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
            for d in range(0, whole, 8):
                l0 += g[d] * g[d]
                l1 += g[d + 1] * g[d + 1]
                l2 += g[d + 2] * g[d + 2]
                l3 += g[d + 3] * g[d + 3]
                l4 += g[d + 4] * g[d + 4]
                l5 += g[d + 5] * g[d + 5]
                l6 += g[d + 6] * g[d + 6]
                l7 += g[d + 7] * g[d + 7]
            left = dim - whole  # FBGEMM's masked last vector: lanes past it add nothing
            if left > 0:
                l0 += g[whole] * g[whole]
            if left > 1:
                l1 += g[whole + 1] * g[whole + 1]
            if left > 2:
                l2 += g[whole + 2] * g[whole + 2]
            if left > 3:
                l3 += g[whole + 3] * g[whole + 3]
            if left > 4:
                l4 += g[whole + 4] * g[whole + 4]
            if left > 5:
                l5 += g[whole + 5] * g[whole + 5]
            if left > 6:
                l6 += g[whole + 6] * g[whole + 6]
            squares = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
            m = momentum[m_base + row] + squares / np.float32(dim)
            momentum[m_base + row] = m
            step = neg_lr / (np.float32(np.sqrt(m)) + eps)
            w = w_base + row * dim
            for d in range(dim):
                weights[w + d] += step * g[d]
    return -1
