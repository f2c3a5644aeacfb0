"""Fake quantization is what the served model sees; QAT's table update is straight-through.

* ``fake_quantize_rows`` equals FBGEMM's row-wise round trip, row by row (so
  quantizing only looked-up rows is exact), edge rows included;
* it equals what torchrec's serving conversion (``QuantEmbeddingBagCollection.from_float``,
  the module ``quantize_embeddings`` / ``quantize_inference_model`` swap in) looks up;
* one FBGEMM training TBE with fused row-wise Adagrad, driven through
  ``LookupFakeQuant``, ends with the same rows as a plain torch model whose
  forward uses fake-quantized rows with straight-through gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch.ao.quantization import PlaceholderObserver
from torchrec.modules.embedding_configs import EmbeddingBagConfig, QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.fake_quant import (
    SERVING_DTYPES,
    fake_quantize_columns,
    fake_quantize_rows,
    fake_quantize_ste,
)
from compression.qat_kernels import LookupFakeQuant

DIM = 8


def _rows() -> torch.Tensor:
    """Random rows over seven decades of scale, then edge rows."""
    g = torch.Generator().manual_seed(0)
    random = torch.randn(60, DIM, generator=g) * torch.logspace(-4, 3, 60).unsqueeze(1)
    edge = torch.stack(
        [
            torch.full((DIM,), 0.5),  # constant, exact in fp16
            torch.full((DIM,), 0.1),  # constant, not exact in fp16
            torch.zeros(DIM),
            torch.linspace(-1e3, 1e3, DIM),  # large range
            1.0 + 1e-6 * torch.randn(DIM, generator=g),  # range below fp16 resolution
            torch.tensor([0.0] * (DIM - 1) + [50.0]),  # one outlier
            -torch.rand(DIM, generator=g) - 3.0,  # all negative
        ]
    )
    return torch.cat([random, edge])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_equals_fbgemm_round_trip_row_by_row(bits: int) -> None:
    rows = _rows()
    fbgemm = torch.ops.fbgemm
    expected = fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
        fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, bits), bits
    )
    assert torch.equal(fake_quantize_rows(rows, bits), expected)
    # Per row, independent of the other rows: quantizing a lookup's rows is exact.
    ids = torch.tensor([61, 3, 61, 66, 0])
    assert torch.equal(fake_quantize_rows(rows[ids], bits), expected[ids])


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [8, 32, 128])
def test_column_slices_with_the_row_range_equal_whole_rows(bits: int, dim: int) -> None:
    """Column-wise shards: every split of a row quantizes as the whole row does."""
    g = torch.Generator().manual_seed(dim)
    rows = torch.randn(40, dim, generator=g) * torch.logspace(-3, 2, 40).unsqueeze(1)
    rows[0], rows[1] = 0.1, torch.linspace(-1.0, 1.0, dim)
    whole = fake_quantize_rows(rows, bits)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    for split in range(1, dim):  # every two-way split, slices of any width
        parts = [
            fake_quantize_columns(rows[:, :split], lo, hi, bits),
            fake_quantize_columns(rows[:, split:], lo, hi, bits),
        ]
        assert torch.equal(torch.cat(parts, dim=1), whole), f"split at column {split}"
    # Without the whole row's range a slice quantizes differently (the test can fail).
    half = rows[:, : dim // 2]
    local = fake_quantize_columns(half, half.amin(dim=1), half.amax(dim=1), bits)
    assert not torch.equal(local, whole[:, : dim // 2])
    with pytest.raises(ValueError, match="num_rows"):
        fake_quantize_columns(rows, lo[:3], hi, bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_edge_rows(bits: int) -> None:
    rows = _rows()
    fq = fake_quantize_rows(rows, bits)
    # Constant rows exact in fp16 come back exactly (bias = the value, codes 0).
    assert torch.equal(fq[60], rows[60]) and torch.equal(fq[62], rows[62])
    # Otherwise the bias is the fp16-rounded minimum and the codes carry the
    # residual (max - bias > 0), so 0.1 comes back closer than fp16(0.1).
    fp16_error = (rows[61].half().float() - rows[61]).abs().max()
    assert (fq[61] - rows[61]).abs().max() < fp16_error
    assert torch.isfinite(fq).all()
    for row, q in zip(rows, fq):
        assert q.unique().numel() <= 2**bits
        step = float(row.max() - row.min()) / (2**bits - 1)
        if step >= 2**-14:  # an fp16 normal scale (smaller ones lose relative precision)
            # Half a step, the fp16 rounding of the scale over all codes, and of the bias.
            bound = 0.5 * step + (2**bits - 1) * step * 2**-11 + abs(float(row.min())) * 2**-11
            assert float((q - row).abs().max()) <= bound


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_matches_torchrec_serving_conversion(bits: int) -> None:
    weight = _rows()
    num_rows = weight.shape[0]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t", num_embeddings=num_rows, embedding_dim=DIM, feature_names=["f"]
            )
        ],
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(weight)
    ebc.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=SERVING_DTYPES[bits]),
    )
    served = QuantEmbeddingBagCollection.from_float(ebc)
    fq = fake_quantize_rows(weight, bits)

    # One id per bag: the served row itself, bit for bit.
    one_each = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.arange(num_rows), lengths=torch.ones(num_rows, dtype=torch.long)
    )
    assert torch.equal(served(one_each).values(), fq)

    # Pooled bags: sums of fake-quantized rows; only the fp32 summation order differs.
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 5, (32,), generator=g)
    ids = torch.randint(0, num_rows, (int(lengths.sum()),), generator=g)
    bags = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)
    offsets = bags.offsets()[:-1]
    expected = F.embedding_bag(ids, fq, offsets, mode="sum")
    # The serving kernel rounds each term's multiply-add into its accumulator
    # (measured: up to 2.7e-6 of the sum of |terms| for int4, vs 1.7e-7 for torch's sum).
    magnitude = F.embedding_bag(ids, fq.abs(), offsets, mode="sum")
    assert ((served(bags).values() - expected).abs() <= 1e-5 * magnitude).all()

    if bits == 8:
        # FBGEMM's other int8 format (fp32 scale and bias) is not what serving uses.
        fbgemm = torch.ops.fbgemm
        fp32_scale = fbgemm.Fused8BitRowwiseQuantizedToFloat(
            fbgemm.FloatToFused8BitRowwiseQuantized(weight)
        )
        assert not torch.equal(fp32_scale, fq)


def _batch(g: torch.Generator, num_rows: list[int], batch_size: int) -> KeyedJaggedTensor:
    lengths = torch.randint(0, 4, (len(num_rows), batch_size), generator=g)
    # Few rows, many ids: bags repeat ids, within a bag and across features.
    values = torch.cat(
        [torch.randint(0, rows, (int(n.sum()),), generator=g) for rows, n in zip(num_rows, lengths)]
    )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(num_rows))], values=values, lengths=lengths.flatten()
    )


def test_fused_rowwise_adagrad_update_is_straight_through() -> None:
    """FBGEMM TBE + LookupFakeQuant == torch forward on fake-quantized rows, STE backward."""
    table_rows, table_bits = [12, 7], [4, 8]
    feature_table_map = [0, 1, 1]  # three features, the last two share table 1
    batch_size, lr, eps = 4, 0.1, 1e-8
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(rows, DIM, generator=g) for rows in table_rows]

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows in table_rows],
        feature_table_map=feature_table_map,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
    )
    views = tbe.split_embedding_weights()
    # The per-table views alias the TBE's real storage: writes through them are seen.
    assert all(v.untyped_storage().data_ptr() == tbe.weights_host.data_ptr() for v in views)
    with torch.no_grad():
        for view, w in zip(views, init):
            view.copy_(w)
    swap = LookupFakeQuant(views, table_bits, feature_table_map)

    ref = [w.clone().requires_grad_() for w in init]
    ref_opt = RowWiseAdagrad(ref, lr=lr, eps=eps)

    for step in range(4):
        kjt = _batch(g, [table_rows[t] for t in feature_table_map], batch_size)
        target = torch.randn(batch_size, DIM * len(feature_table_map), generator=g)

        masters = [v.clone() for v in views]
        swap.swap_in(kjt.values(), kjt.offset_per_key())
        out = tbe(indices=kjt.values(), offsets=kjt.offsets())
        swap.restore()
        # Before backward the TBE holds the fp32 master rows again, bit for bit.
        assert all(torch.equal(v, m) for v, m in zip(views, masters))
        if step == 0:
            fp32 = tbe(indices=kjt.values(), offsets=kjt.offsets()).detach()
            assert (out.detach() - fp32).abs().max() > 1e-3, "fake quantization did nothing"
        ((out - target) ** 2).sum().backward()  # the fused optimizer updates the rows here

        quantized = [fake_quantize_ste(r, bits) for r, bits in zip(ref, table_bits)]
        ref_out = torch.cat(
            [
                F.embedding_bag(kjt[f].values(), quantized[t], kjt[f].offsets()[:-1], mode="sum")
                for f, t in zip(kjt.keys(), feature_table_map)
            ],
            dim=1,
        )
        torch.testing.assert_close(out.detach(), ref_out.detach(), rtol=0, atol=1e-6)
        ref_opt.zero_grad()
        ((ref_out - target) ** 2).sum().backward()
        ref_opt.step()

        for view, r in zip(views, ref):
            torch.testing.assert_close(view, r.detach(), rtol=0, atol=1e-6)
