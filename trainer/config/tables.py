"""The run's tables, derived once from the data source and the config.

Every part of a run that needs to know the tables (build, planning, the
converters, validation, export) reads one :class:`RunTables`:

- ``model``: the tables the model builds (``model.tables``, or one per
  categorical feature of the source, sized by it);
- ``trained``: every table the trained module holds: ``model`` plus, with
  ``distill=online`` (own tables), the student's ``s_<name>`` tables;
- ``served``: the tables of the exported model (the student's when distilling);
- ``qat_bits``: per trained table, the bits its QAT fake-quant uses (tables left
  out train in fp32);
- ``export_bits``: per served table, the serving bits: the QAT bits, or
  ``trainer.export_bits`` for every table when QAT was off (post-training).

Example::

    tables = run_tables(cfg, features=source.features)
    tables.trained        # what the planner shards
    tables.export_bits    # {"t_cat_0": 4, ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from trainer.config.schema import Config, DistillConfig, ModelConfig, QATConfig, TableConfig
from trainer.data.source import FeatureSpec

STUDENT_PREFIX = "s_"


@dataclass(frozen=True)
class RunTables:
    """The tables of one run (see the module docstring)."""

    model: list[TableConfig]
    trained: list[TableConfig]
    served: list[TableConfig]
    qat_bits: dict[str, int]
    export_bits: dict[str, int]
    features: list[FeatureSpec]

    def pooling_factors(self) -> dict[str, list[float]]:
        """Per trained table, the mean ids per sample of each of its features."""
        by_feature = {f.name: f.ids_per_sample for f in self.features}
        return {t.name: [by_feature[f] for f in t.feature_names] for t in self.trained}

    def feature_rows(self) -> dict[str, int]:
        """Rows of the model table each feature feeds (the served tables read the same)."""
        return {f: t.num_embeddings for t in self.model for f in t.feature_names}


def run_tables(
    cfg: Config,
    *,
    features: Sequence[FeatureSpec],
    export_bits_override: int | None = None,
) -> RunTables:
    """The tables of ``cfg`` over the source's ``features``.

    ``export_bits_override``: serve every table at these bits (offline export).
    """
    model = resolved_tables(cfg.model, features)
    trained = model_tables(cfg.distill, model)
    served = [t for t in trained if t not in model] or list(model)
    qat = trained_qat_bits(cfg.qat, cfg.distill, trained=trained, served=served)
    if export_bits_override:
        export = uniform_bits(cfg.qat, served, export_bits_override)
    else:
        export = {t.name: qat[t.name] for t in served if t.name in qat}
        export = export or uniform_bits(cfg.qat, served, cfg.trainer.export_bits)
    return RunTables(
        model=model,
        trained=trained,
        served=served,
        qat_bits=qat,
        export_bits=export,
        features=list(features),
    )


def resolved_tables(model: ModelConfig, features: Sequence[FeatureSpec]) -> list[TableConfig]:
    """The tables the model builds: the explicit list, or one per categorical feature."""
    if model.tables:
        return [
            TableConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim or model.embedding_dim,
                feature_names=list(t.feature_names),
                pooling=t.pooling,
            )
            for t in model.tables
        ]
    return [
        TableConfig(
            name=f"t_{f.name}",
            num_embeddings=f.num_embeddings,
            embedding_dim=model.embedding_dim,
            feature_names=[f.name],
            pooling=model.pooling,
        )
        for f in features
    ]


def student_tables(tables: Sequence[TableConfig], *, embedding_dim: int) -> list[TableConfig]:
    """The student's own tables: one per teacher table, same rows and features."""
    return [replace(t, name=STUDENT_PREFIX + t.name, embedding_dim=embedding_dim) for t in tables]


def model_tables(distill: DistillConfig, tables: Sequence[TableConfig]) -> list[TableConfig]:
    """Every table the trained model holds: ``tables`` (the model's), plus the
    distillation student's own tables (``s_<name>``) with ``distill=online``."""
    if distill.name == "none" or distill.share_tables:
        return list(tables)
    return list(tables) + student_tables(tables, embedding_dim=distill.embedding_dim)


def uniform_bits(qat: QATConfig, tables: Sequence[TableConfig], bits: int) -> dict[str, int]:
    """``bits`` for every table, but ``qat.small_table_bits`` under ``qat.small_table_rows``."""
    return {
        t.name: qat.small_table_bits if t.num_embeddings < qat.small_table_rows else bits
        for t in tables
    }


def qat_bits(qat: QATConfig, tables: Sequence[TableConfig]) -> dict[str, int]:
    """Per table, the bits its QAT fake-quant uses; tables left out train in fp32."""
    bits = uniform_bits(qat, tables, qat.bits) if qat.bits else {}
    bits.update(qat.table_bits)
    return {name: b for name, b in bits.items() if b}


def trained_qat_bits(
    qat: QATConfig,
    distill: DistillConfig,
    *,
    trained: Sequence[TableConfig],
    served: Sequence[TableConfig],
) -> dict[str, int]:
    """QAT bits of every trained table (``distill.student_qat_bits`` for the student's)."""
    bits = qat_bits(qat, trained)
    if distill.name != "none" and distill.student_qat_bits:
        bits.update(uniform_bits(qat, served, distill.student_qat_bits))
    return bits
