"""The run's tables, derived once from the data source and the config.

Every part of a run that needs to know the tables (build, planning, the
converters, validation, export) reads one :class:`RunTables`:

- ``model``: the field tables the model builds (``model.tables``, or one per
  categorical feature of the source, sized by it);
- ``trained``: every table the trained module holds: ``model`` (as stored: a
  factorized table's ``rows x rank`` table or QR pair, trainer/config/factor_tables.py), the wide
  (first-order) tables ``w_<name>`` of a deepfm / wide_deep model (see
  :func:`wide_tables`), plus, with ``distill=online`` (own tables), the
  student's ``s_<name>`` tables (and their ``w_s_<name>`` if the student is wide);
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

from trainer.config.factor_tables import factorize, input_feature, stored_tables
from trainer.config.schema import Config, DistillConfig, ModelConfig, QATConfig, TableConfig
from trainer.data.source import FeatureSpec
from trainer.errors import ConfigError

STUDENT_PREFIX = "s_"
WIDE_PREFIX = "w_"
# A wide table holds one weight per id (a logistic regression on the ids), but is
# WIDE_DIM wide: FBGEMM's training kernels (``construct_split_state``) assert
# ``embedding_dim % 4 == 0``. Column 0 is the weight; columns 1..3 start at zero
# and get no gradient, so they stay zero, and a row quantizes as [w, 0, 0, 0]:
# one end of its range is 0 and the other w, so w is served exactly (up to the
# fp16 scale) at any bits (trainer/models/ctr.py).
WIDE_DIM = 4
# Architectures with a first-order part, i.e. one wide table per field table.
WIDE_ARCHS = ("deepfm", "wide_deep")


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
        return {
            t.name: [by_feature[input_feature(f, by_feature)] for f in t.feature_names]
            for t in self.trained
        }

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
    model = factorize(cfg.model, resolved_tables(cfg.model, features))
    if any(t.rank or t.qr_buckets for t in model) and (
        cfg.distill.name != "none" or cfg.prune.min_access or cfg.prune.row_min_norm
    ):
        raise ConfigError(
            "factorized tables (model.table_rank / qr_* / mixed_dims, tables[].rank / qr_*) "
            "do not yet combine with distill=online or row pruning (prune.min_access, "
            "prune.row_min_norm); drop one"
        )
    # A wide model's w_<table> tables stay plain, over the input features (factorized or not).
    wide = wide_tables(model) if str(cfg.model.arch) in WIDE_ARCHS else []
    teacher = stored_tables(model) + wide
    student = own_student_tables(cfg.distill, cfg.model, model)
    trained = teacher + student
    served = student or teacher
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
                rank=t.rank,
                qr_buckets=t.qr_buckets,
                qr_op=t.qr_op,
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


def wide_tables(tables: Sequence[TableConfig]) -> list[TableConfig]:
    """The first-order tables of ``tables``: ``w_<name>``, same rows, features and
    pooling, ``WIDE_DIM`` columns of which the model reads the first."""
    return [
        replace(t, name=WIDE_PREFIX + t.name, embedding_dim=WIDE_DIM, rank=0, qr_buckets=0)
        for t in tables
    ]


def arch_tables(arch: str, tables: Sequence[TableConfig]) -> list[TableConfig]:
    """Every table a model of ``arch`` over the field ``tables`` holds (wide ones too)."""
    return list(tables) + (wide_tables(tables) if arch in WIDE_ARCHS else [])


def student_arch(distill: DistillConfig, model: ModelConfig) -> str:
    """The distillation student's architecture: ``distill.arch``, else the teacher's."""
    return str(distill.arch or model.arch)


def own_student_tables(
    distill: DistillConfig, model: ModelConfig, tables: Sequence[TableConfig]
) -> list[TableConfig]:
    """The student's own tables with ``distill=online`` (none when it shares the
    teacher's): ``s_<name>`` per field table, and their ``w_s_<name>`` if it is wide."""
    if distill.name == "none" or distill.share_tables:
        return []
    fields = student_tables(tables, embedding_dim=distill.embedding_dim)
    return arch_tables(student_arch(distill, model), fields)


def model_tables(
    distill: DistillConfig, tables: Sequence[TableConfig], model: ModelConfig | None = None
) -> list[TableConfig]:
    """Every table the trained model holds: the model's (``tables`` and, for a wide
    ``model.arch``, their wide tables), plus the student's own with ``distill=online``."""
    model = model or ModelConfig()
    return arch_tables(str(model.arch), tables) + own_student_tables(distill, model, tables)


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
