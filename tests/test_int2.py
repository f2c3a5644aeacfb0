"""int2 tables: the QAT forward is what the int2 export serves, and what int2 rows cost."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compression.export import fake_quantize_tables, quantize_for_serving, table_bytes
from tests.test_sharding_equivalence import tiny_config
from trainer.build import build_unsharded
from trainer.config import resolved_tables, to_config
from trainer.converters import export_bits
from trainer.data import SyntheticCriteo


@torch.no_grad()
def test_int2_export_serves_the_fake_quantized_rows_exactly() -> None:
    cfg = tiny_config("table_wise")
    torch.manual_seed(0)
    model = build_unsharded(cfg, device=torch.device("cpu")).model.eval()
    bits = {f"t_cat_{i}": 2 for i in range(4)}
    served = quantize_for_serving(model, table_bits=bits)
    fake_quantize_tables(model, table_bits=bits)
    batch = next(
        iter(
            SyntheticCriteo(cfg.data).train_batches(
                batch_size=256, rank=0, world_size=1, first_step=0, num_steps=1
            )
        )
    )
    want = model(batch.dense_features, batch.sparse_features)
    got = served(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Four levels per row: a coarse format, not a no-op.
    weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight
    assert max(len(row.unique()) for row in weight) <= 4


def _bytes(dim: int, bits: int) -> int:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t", num_embeddings=1000, embedding_dim=dim, feature_names=["f"]
            )
        ],
        device=torch.device("cpu"),
    )
    # quantize_inference_model swaps child modules, so the collection needs a parent.
    return table_bytes(quantize_for_serving(nn.ModuleDict({"ebc": ebc}), table_bits={"t": bits}))


def test_int2_is_no_smaller_than_int4_at_dim_16_but_is_at_dim_128() -> None:
    # dim 16: codes 4 (int2) or 8 (int4) bytes + 4 of fp16 scale/bias, padded to 16.
    # (Plus a few hundred bytes of the kernel's per-table metadata.)
    assert _bytes(16, 2) == _bytes(16, 4) and _bytes(16, 2) // 1000 == 16
    # dim 128: 32 + 4 -> 48 bytes against 64 + 4 -> 80.
    assert _bytes(128, 2) // 1000 == 48 and _bytes(128, 4) // 1000 == 80


def test_qat_int2_composes_and_exports_at_2_bits(compose_cfg) -> None:  # noqa: ANN001
    cfg = to_config(compose_cfg(["qat=int2"]))
    tables = resolved_tables(cfg, cfg.data.features)
    assert set(export_bits(cfg, tables).values()) == {2}
