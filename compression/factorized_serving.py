"""The served lookup of factorized tables: derived ids, packed stored rows, the combine.

:class:`FactorizedLookup` stands where a served program's ``tables`` collection
stands (compression/bundle.py) and reads the same inputs, every input feature's
ids and lengths in KJT order: it derives the lookup's ids
(compression/factorized.py: ``Factorized.split_ids``), looks the stored tables
up in FBGEMM's packed rows (compression/bundle_tables.py: ``PackedTables``, so
QAT's int8/int4 rows are served byte for byte), then projects / combines each
feature back to the model's width, fp32, with the trained projections. The
program's head sees what an unfactorized model's collection gives it
(``[B, F * D]``, model order), so the DLRM head is unchanged.

With a QR table the lookup's keys hold every input feature twice (``f`` or
``f_q``, then ``f_r``); the ``f_r`` copy of a non-QR feature reads row 0 of its
own table and is dropped, which keeps every shape static for ``torch.export``.

Example::

    lookup = factorized_lookup(packed_by_table, factorized=model.sparse_arch.factorized,
                               feature_tables=stored_feature_tables,
                               feature_names=["cat_0", "cat_1"], model_order=["cat_0", "cat_1"])
    pooled = lookup(ids, lengths)                     # float32[B, F * D]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from compression.bundle_tables import PackedTable, PackedTables, packed_tables
from compression.factorized import REMAINDER, Factorized


class FactorizedLookup(nn.Module):
    """``(ids, lengths) -> float32[B, F * D]`` over factorized tables (module docstring)."""

    def __init__(
        self,
        packed: PackedTables,
        factorized: Factorized,
        *,
        feature_names: Sequence[str],
        stored_order: Sequence[str],
        model_order: Sequence[str],
    ) -> None:
        super().__init__()
        self.packed = packed
        self.factorized = factorized
        self.feature_names = list(feature_names)
        self.stored_order = list(stored_order)
        dims = factorized.stored_feature_dims()
        self.stored_dims = [dims[f] for f in self.stored_order]
        self.model_order = list(model_order)
        out_dims = {f: s.dim for s in factorized.specs for f in s.feature_names}
        self.model_dims = [out_dims[f] for f in self.model_order]
        self.num_features = len(self.feature_names)

    @property
    def weights(self) -> Tensor:
        """The packed stored rows (what ``ServingProgram.table_bytes`` counts)."""
        return self.packed.weights

    def extra_bytes(self) -> int:
        """Bytes of the projections (fp32), served beside the packed rows."""
        return sum(p.numel() * p.element_size() for p in self.factorized.parameters())

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        ids, lengths = self.factorized.split_ids(self.feature_names, ids, lengths)
        pooled = self.packed(ids, lengths)[:, : sum(self.stored_dims)]
        by_feature = dict(zip(self.stored_order, pooled.split(self.stored_dims, dim=1)))
        combined = self.factorized.combine(by_feature)
        return torch.cat([combined[f] for f in self.model_order], dim=1)


def factorized_lookup(
    tables: dict[str, PackedTable],
    *,
    factorized: Factorized,
    feature_tables: dict[str, str],
    feature_names: list[str],
    model_order: list[str],
) -> FactorizedLookup:
    """The :class:`FactorizedLookup` over the stored ``tables`` (packed, by table name;
    emptied as they are copied in). ``feature_tables``: the stored table of each stored
    feature; ``feature_names``: the input order; ``model_order``: the model's features."""
    keys = factorized.lookup_keys(feature_names)
    used = [k for k in keys if k in feature_tables]
    unused = [k for k in keys if k not in feature_tables]
    # An unused f_r copy (non-QR f) reads its own feature's table (row 0), then is dropped.
    reads = {**feature_tables, **{k: feature_tables[k[: -len(REMAINDER)]] for k in unused}}
    stored_order = [f for s in factorized.specs for t in s.stored() for f in t.feature_names]
    assert sorted(stored_order) == sorted(used), (stored_order, used)
    packed = packed_tables(
        tables, feature_tables=reads, feature_names=keys, model_order=stored_order + unused
    )
    return FactorizedLookup(
        packed,
        factorized,
        feature_names=feature_names,
        stored_order=stored_order,
        model_order=model_order,
    )
