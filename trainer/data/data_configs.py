"""Schemas of the prepared-data sources: ``data=criteo`` and ``data=table``.

Both are read twice: by ``python -m trainer.prepare`` (``raw`` files into
binary shards under ``dir``) and by the trainer (which reads only ``dir`` and
the reader settings). Each is stored in Hydra's ConfigStore group ``data`` as
``<name>_schema``; ``conf/data/<name>.yaml`` starts with
``defaults: [<name>_schema, _self_]``.

How raw ids become table rows (``mapping``), the same for both sources:

- ``hash``: row ``1 + id % (rows - 1)``; a Criteo id is its hex number, any
  other id (string or integer) the 64-bit FNV-1a hash of its text;
- ``vocab``: a first pass counts every id of the train rows; ids seen at least
  ``min_count`` times get rows ``2, 3, ...`` (most frequent first, at most
  ``rows - 2`` of them when ``table_rows`` is set), every other id shares the
  out-of-vocabulary row 1;
- an empty field (a missing value) is row 0 in both.

Example::

    cs = ConfigStore.instance()
    register_data_schemas(cs)
    # python -m trainer.prepare data=criteo 'data.raw=[day_0]' data.dir=data/criteo
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hydra.core.config_store import ConfigStore


class Mapping(StrEnum):
    hash = "hash"
    vocab = "vocab"


class OnBadRow(StrEnum):
    error = "error"
    skip = "skip"


class TableFormat(StrEnum):
    auto = "auto"  # from the file name: .parquet / .csv / .tsv / .inter/.user/.item (atomic)
    parquet = "parquet"
    csv = "csv"
    tsv = "tsv"
    # RecBole's atomic files: tab-separated, a header of name:type (user_id:token).
    atomic = "atomic"


class PartitionBy(StrEnum):
    none = "none"
    day = "day"  # one partition per UTC day, named 2026-12-01
    hour = "hour"  # one per UTC hour, named 2026-12-01T13


class TimestampUnit(StrEnum):
    """The unit of integer timestamps (seconds, milliseconds ... since 1970-01-01 UTC)."""

    s = "s"
    ms = "ms"
    us = "us"
    ns = "ns"


class DenseNorm(StrEnum):
    standardize = "standardize"
    none = "none"


class DenseTransform(StrEnum):
    none = "none"
    log1p = "log1p"  # log(1 + max(x, 0)), as Criteo's counts


# Criteo Kaggle's 26 cardinalities, capped at 1M rows (row 0 is the missing
# value), so that the default tables fit a few GB of fp32 with Adagrad state.
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
MAX_DEFAULT_ROWS = 1_000_000
DEFAULT_CRITEO_ROWS = [min(c + 1, MAX_DEFAULT_ROWS) for c in CRITEO_KAGGLE_CARDINALITIES]


@dataclass
class PreparedDataConfig:
    """What every prepared source shares: raw inputs, the output directory, the
    mapping, bad rows, the eval split and the reader's settings."""

    name: str = ""
    # Input files (prepare only): the train split.
    raw: list[str] = field(default_factory=list)
    # Input files of the eval split; empty: the last eval_fraction of raw's rows.
    eval_raw: list[str] = field(default_factory=list)
    # The prepared directory (written by prepare, read by the trainer).
    dir: str = ""
    mapping: Mapping = Mapping.hash
    # vocab: ids seen fewer times share the out-of-vocabulary row.
    min_count: int = 3
    # A partition (a day, an hour) of a partitioned dataset: prepare writes
    # dir/partitions/<partition>/ and appends it to dir/manifest.json, extending
    # the vocabulary (mapping=vocab) without renumbering an id that has a row;
    # tables then have table_rows rows in every partition (trainer.data.partitions).
    # "": the whole dataset in dir.
    partition: str = ""
    # Rows per table: one value for every feature or one per feature. hash: the
    # table size; vocab: the most rows a table gets (0: as many as ids kept).
    table_rows: list[int] = field(default_factory=lambda: [MAX_DEFAULT_ROWS])
    # Without eval_raw, the last eval_fraction of raw's rows become the eval split.
    eval_fraction: float = 0.05
    on_bad_row: OnBadRow = OnBadRow.error
    # Processes for prepare; 0: one per CPU core.
    num_workers: int = 0
    # Bytes of raw input each worker parses at a time (bounds prepare's memory).
    chunk_bytes: int = 16 << 20
    # Reader: the per-epoch shuffle's seed (None: trainer.seed); shuffle at all.
    seed: int | None = None
    shuffle: bool = True
    # Reader: scan every id once on open (ids outside a table fail with the file).
    check_ids: bool = True
    # Reader: standardize: each dense column becomes (x - mean) / std with the
    # per-column mean and std of the train split's present values (computed by
    # prepare, stored in metadata.json; eval uses the same) and a missing value
    # (an empty field) becomes 0, the mean: the usual input normalization; the
    # model sees ~0 +- 1 and learns faster than from log1p counts (~5 +- 1).
    # none: the raw stored values, missing = 0 (Criteo: log1p, as MLPerf /
    # torchrec's DLRM).
    dense_norm: DenseNorm = DenseNorm.standardize


@dataclass
class CriteoDataConfig(PreparedDataConfig):
    """``data=criteo``: Criteo Kaggle / 1TB TSV (label, 13 integers, 26 hex ids)."""

    name: str = "criteo"
    table_rows: list[int] = field(default_factory=lambda: list(DEFAULT_CRITEO_ROWS))


@dataclass
class JoinConfig:
    """A side table (users, items) joined onto every row by a key column."""

    raw: str = ""
    on: str = ""
    format: TableFormat = TableFormat.auto


@dataclass
class TableDataConfig(PreparedDataConfig):
    """``data=table``: Parquet / CSV / TSV tables read with pyarrow."""

    name: str = "table"
    format: TableFormat = TableFormat.auto
    # Side tables looked up by key (a left join; keys not found: missing values).
    joins: list[JoinConfig] = field(default_factory=list)
    label: str = ""
    # label >= threshold is a click; None: the label column is already 0/1.
    label_threshold: float | None = None
    dense: list[str] = field(default_factory=list)
    dense_transform: DenseTransform = DenseTransform.none
    # Single-valued id columns (strings or integers).
    categorical: list[str] = field(default_factory=list)
    # List-valued id columns (multi-hot): Parquet lists, or text split on list_separator.
    multi_hot: list[str] = field(default_factory=list)
    list_separator: str = " "
    # Numeric columns turned into a categorical feature <column>_bucket: the
    # index of the bucket (boundaries ascending) the value falls in.
    buckets: dict[str, list[float]] = field(default_factory=dict)
    # Rows read per batch (bounds prepare's memory).
    batch_rows: int = 65536
    # Cut the rows into partitions by timestamp_column (UTC day or hour), each
    # appended to the partitioned dataset dir in time order (trainer.prepare.partition_by_time).
    partition_by: PartitionBy = PartitionBy.none
    # The time of each row: an Arrow timestamp or date, an integer (timestamp_unit
    # since 1970 UTC), or text: such an integer or ISO 8601 (no zone: UTC). Not a feature.
    timestamp_column: str = ""
    timestamp_unit: TimestampUnit = TimestampUnit.s
    # A strptime format for times written as text or digits in another form than those
    # (e.g. Avazu's hour 14102100: %y%m%d%H; 20141021: %Y%m%d); no zone: UTC. "": off.
    timestamp_format: str = ""


def register_data_schemas(cs: ConfigStore | None = None) -> None:
    """Stores ``criteo_schema`` and ``table_schema`` in the ConfigStore group ``data``."""
    cs = cs or ConfigStore.instance()
    cs.store(group="data", name="criteo_schema", node=CriteoDataConfig)
    cs.store(group="data", name="table_schema", node=TableDataConfig)
