"""Row-wise fake quantization: the values a served int8/int4 table gives back.

torchrec's serving conversion (``quantize_embeddings`` /
``QuantEmbeddingBagCollection.from_float``) quantizes each fp32 row with
FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` (for int8 too): one
fp16 scale and one fp16 bias (the row minimum) per row, codes in
``[0, 2**bits - 1]``. The serving kernel (``IntNBitTableBatchedEmbeddingBagsCodegen``)
reads a row back as ``scale * code + bias`` in fp32, which is exactly what
``FusedNBitRowwiseQuantizedSBHalfToFloat`` returns (the product of an fp16
scale and a code of at most 8 bits is exact in fp32, so there is one rounding
either way). Calling FBGEMM's own pair therefore *defines* the forward value:
no reimplementation to drift from it.

Note: ``FloatToFused8BitRowwiseQuantized`` (fp32 scale and bias) is a different
format that torchrec's serving path does not use; its rows differ.

Example::

    rows = table[ids]                          # (num_ids, dim) fp32
    served = fake_quantize_rows(rows, bits=4)  # what the int4 model will look up
    ste = fake_quantize_ste(weight, bits=4)    # same forward, gradient passes straight
    # int2 against each row's fitted range (compression/row_range.py), not its min/max:
    served2 = fake_quantize_rows(rows, bits=2, row_range="mse")
    # A column slice of rows whose other columns live elsewhere (column-wise shards):
    part = fake_quantize_columns(rows[:, :8], row_min, row_max, bits=4)
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from torch import Tensor

from compression.row_range import check_range, clamp_to_fitted

# The row-wise formats torchrec serves (DataType.INT8 / INT4 / INT2), and the
# dtype that asks torchrec's quantize_embeddings / quantize_inference_model for each
# (``per_table_weight_dtype``), so the export quantizes what QAT trained against.
SERVING_DTYPES = {8: torch.qint8, 4: torch.quint4x2, 2: torch.quint2x4}
BITS = tuple(SERVING_DTYPES)


def check_bits(bits: int, *, what: str = "bits") -> None:
    if bits not in BITS:
        raise ValueError(f"{what}={bits} is not a served row-wise format; use one of {BITS}")


def quantize_rows(rows: Tensor, bits: int) -> Tensor:
    """FBGEMM's fused row-wise format: ``(n, dim * bits / 8 + 4)`` uint8, fp16 scale+bias last."""
    check_bits(bits)
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows.contiguous(), bits)


def dequantize_rows(quantized: Tensor, bits: int) -> Tensor:
    """The fp32 rows a serving TBE reads back from :func:`quantize_rows`' output."""
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(quantized, bits)


@torch.no_grad()
def fake_quantize_rows(rows: Tensor, bits: int, *, row_range: str = "minmax") -> Tensor:
    """``dequantize(quantize(rows))`` per row, bit for bit as the served model sees it.

    ``row_range``: ``"minmax"`` (FBGEMM's own range) or ``"mse"`` (each row
    clamped to its fitted range first, see compression/row_range.py). No
    autograd: callers apply it to the rows of a lookup and keep the gradient
    straight-through (the fused optimizer updates the fp32 master rows).
    """
    if rows.dim() != 2:
        raise ValueError(f"fake_quantize_rows takes (num_rows, dim), got shape {tuple(rows.shape)}")
    check_range(row_range)
    if rows.shape[0] == 0:
        return rows.clone()
    if row_range == "mse":
        rows = clamp_to_fitted(rows, bits)
    # FBGEMM's CPU and CUDA ops both exist; the round trip stays on rows.device.
    return dequantize_rows(quantize_rows(rows, bits), bits).to(rows.dtype)


def fake_quantize_ste(weight: Tensor, bits: int, *, row_range: str = "minmax") -> Tensor:
    """Forward: exactly ``fake_quantize_rows(weight)``; backward: the identity.

    For a whole (small, unsharded) table, e.g. an unsharded reference of QAT.
    ``weight - weight.detach()`` is exactly zero, so the forward value is not
    perturbed by a rounding of ``w + (fq - w)``.
    """
    served = fake_quantize_rows(weight.detach(), bits, row_range=row_range)
    return served + (weight - weight.detach())


# Width the padded slice is rounded up to: FBGEMM needs each fused row's byte
# count to keep the fp16 scale/bias aligned; 16 columns is enough for 2/4/8 bits.
_COLUMN_ALIGN = 16


@torch.no_grad()
def fake_quantize_columns(cols: Tensor, row_min: Tensor, row_max: Tensor, bits: int) -> Tensor:
    """``fake_quantize_rows`` of whole rows, restricted to the columns in ``cols``.

    ``cols`` is ``(num_rows, width)``, some columns of each row; ``row_min`` and
    ``row_max`` (``(num_rows,)``) are the whole rows' minimum and maximum, which
    are all the row-wise format depends on besides an element's own value (for
    a fitted range: the columns clamped to ``[lo, hi]``, passed as min/max). The
    slice is extended by ``[row_min, row_max]`` (and ``row_min`` padding), so
    FBGEMM's own quantizer sees the whole row's range and quantizes every slice
    element exactly as it would in the whole row; the extra columns are dropped.
    """
    if cols.dim() != 2 or row_min.shape != cols.shape[:1] or row_max.shape != cols.shape[:1]:
        raise ValueError(
            f"fake_quantize_columns takes (num_rows, width) columns and (num_rows,) min/max, "
            f"got {tuple(cols.shape)}, {tuple(row_min.shape)}, {tuple(row_max.shape)}"
        )
    width = cols.shape[1]
    pad = -(width + 2) % _COLUMN_ALIGN
    lo, hi = row_min.to(cols.dtype)[:, None], row_max.to(cols.dtype)[:, None]
    extended = torch.cat([cols, lo, hi, lo.expand(-1, pad)], dim=1)
    return fake_quantize_rows(extended, bits)[:, :width]
