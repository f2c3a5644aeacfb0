"""Which tables are factorized, and the tables the model then stores.

The model's tables (``RunTables.model``) stay the logical ones, each with its
resolved ``rank`` (stored width; 0: full), ``qr_buckets`` and ``qr_op``
(:func:`factorize`); everything that acts on stored rows (the planner, QAT,
the export) reads :func:`stored_tables` instead: a rank-r table is one
``rows x r`` table, a QR table two, ``<t>_q`` and ``<t>_r`` (features ``<f>_q``,
``<f>_r``). See compression/factorized.py for the model side.

Rules, per table (a per-table setting wins over the model-wide one):

* width: ``tables[].rank``, else ``model.table_rank``, else with ``model.mixed_dims
  = alpha > 0`` the width ``dim * (min rows / rows)^alpha`` rounded up to a
  multiple of 4 (at least 4): the smallest table keeps ``dim``. A sample reads one
  bag per feature, so a row of a large table is read less often: Ginart et al.'s
  frequency rule with row count as the frequency. A width of ``dim`` or more is full;
* QR: ``tables[].qr_buckets``, else ``model.qr_buckets`` (0: ``ceil(sqrt(rows))``,
  the split with the fewest rows) for tables of at least ``model.qr_min_rows`` rows.

Example::

    model = factorize(cfg.model, resolved)      # t.rank, t.qr_buckets resolved
    stored = stored_tables(model)                # what the planner shards
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from compression.factorized import QR_OPS, FactorSpec
from trainer.config.schema import ModelConfig, TableConfig
from trainer.errors import ConfigError


def _key(model: ModelConfig, i: int, name: str) -> str:
    return f"model.tables[{i}]" if model.tables else f"table {name}"


def factorize(model: ModelConfig, tables: Sequence[TableConfig]) -> list[TableConfig]:
    """``tables`` with ``rank``, ``qr_buckets`` and ``qr_op`` resolved (module docstring)."""
    min_rows = min((t.num_embeddings for t in tables), default=1)
    out = []
    for i, t in enumerate(tables):
        key = _key(model, i, t.name)
        dim = t.embedding_dim
        rank = t.rank or model.table_rank
        if not rank and model.mixed_dims > 0:
            scaled = dim * (min_rows / t.num_embeddings) ** model.mixed_dims
            rank = max(4, 4 * math.ceil(scaled / 4))
        if rank and rank % 4:
            raise ConfigError(
                f"{key}: rank {rank} is not a multiple of 4 (FBGEMM's training kernels); "
                "set tables[].rank / model.table_rank to one"
            )
        rank = 0 if rank >= dim else rank
        buckets = t.qr_buckets
        if not buckets and model.qr_min_rows and t.num_embeddings >= model.qr_min_rows:
            buckets = model.qr_buckets or math.ceil(math.sqrt(t.num_embeddings))
        if buckets and not 1 < buckets < t.num_embeddings:
            raise ConfigError(
                f"{key}: qr_buckets={buckets} must be in (1, rows={t.num_embeddings}); "
                "lower model.qr_buckets / tables[].qr_buckets or raise model.qr_min_rows"
            )
        op = t.qr_op or model.qr_op
        if op not in QR_OPS:
            raise ConfigError(f"{key}: qr_op={op!r} is not known; use one of {list(QR_OPS)}")
        out.append(replace(t, rank=rank, qr_buckets=buckets, qr_op=op))
    return out


def factor_spec(t: TableConfig) -> FactorSpec:
    """The :class:`FactorSpec` of a resolved table."""
    return FactorSpec(
        name=t.name,
        feature_names=list(t.feature_names),
        rows=t.num_embeddings,
        dim=t.embedding_dim,
        width=t.rank,
        qr_buckets=t.qr_buckets,
        qr_op=t.qr_op or "mul",
        pooling=str(t.pooling),
    )


def stored_tables(tables: Sequence[TableConfig]) -> list[TableConfig]:
    """The tables the collection stores for the resolved ``tables``."""
    return [
        TableConfig(
            name=s.name,
            num_embeddings=s.rows,
            embedding_dim=s.dim,
            feature_names=list(s.feature_names),
            pooling=t.pooling,
        )
        for t in tables
        for s in factor_spec(t).stored()
    ]


def input_feature(stored_feature: str, inputs: Sequence[str]) -> str:
    """The input feature a stored table's feature reads (``cat_0_q`` -> ``cat_0``)."""
    if stored_feature in inputs:
        return stored_feature
    return stored_feature[:-2]
