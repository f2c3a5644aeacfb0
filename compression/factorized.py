"""Factorized tables: low-rank, compositional (quotient-remainder) and mixed-width.

A factorized table is stored smaller than the ``dim`` the model's interaction
reads, and a small dense module after the lookup (:class:`Factorized`) turns
its pooled output back into a ``dim``-wide vector:

* **low rank / mixed dims** (``width < dim``): the table is ``rows x width``;
  a learned ``width x dim`` projection (``nn.Linear`` without bias) follows the
  lookup. Low rank picks one width for every table, mixed dims one per table
  (e.g. by row count); both are the same module.
* **quotient-remainder** (``qr_buckets = m``, Shi et al., KDD'20): two tables,
  ``<t>_q`` (``ceil(rows / m)`` rows, read by feature ``<f>_q`` with ids
  ``id // m``) and ``<t>_r`` (``m`` rows, feature ``<f>_r``, ids ``id % m``),
  combined by ``mul`` (elementwise product), ``add`` or ``concat`` (then
  projected to ``dim``). The pooled bags are combined, so with sum pooling a
  multi-id bag's ``mul`` is the product of the two sums (per id exactly only
  for one id per bag); ``add`` and ``concat`` commute with pooling.

Everything before and after the lookup is an ordinary tensor op, so the
collection holding the stored tables is an ordinary torchrec
``EmbeddingBagCollection``: every sharding strategy, table QAT (on the stored
rows) and the packed export apply unchanged, and the projections are dense
parameters (replicated, trained by the dense optimizer, exported in fp32).

The derived ids are made on device from the KJT (no host sync). With any QR
table, the lookup's KJT holds every input feature twice: first ``f`` (or
``f_q`` with ids ``id // m``), then ``f_r`` (ids ``id % m``); the ``f_r``
copies of non-QR features are read by no table (the collection drops them)::

    keys  [cat_0, cat_1]          (cat_1 is QR with m = 10)
    ids   [3, 7 | 15, 42]  ->  keys [cat_0, cat_1_q, cat_0_r, cat_1_r]
                               ids  [3, 7 | 1, 4 | 0, 0 | 5, 2]

Example::

    specs = [FactorSpec("t_a", ["a"], rows=1000, dim=16, width=4),
             FactorSpec("t_b", ["b"], rows=10**6, dim=16, qr_buckets=1000, qr_op="mul")]
    ebc = EmbeddingBagCollection(tables=stored_configs(specs), device=device)
    factorized = Factorized(specs, device=device)
    pooled = factorized.combine(ebc(factorized.split_kjt(kjt)).to_dict())  # f -> [B, 16]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

QR_OPS = ("mul", "add", "concat")
QUOTIENT, REMAINDER = "_q", "_r"


@dataclass(frozen=True)
class FactorSpec:
    """One model table as factorized: ``dim`` the width the model reads, ``width``
    the stored width (``dim``: full), ``qr_buckets`` the QR split (0: none)."""

    name: str
    feature_names: list[str]
    rows: int
    dim: int
    width: int = 0
    qr_buckets: int = 0
    qr_op: str = "mul"
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if not self.width:
            object.__setattr__(self, "width", self.dim)
        if self.qr_op not in QR_OPS:
            raise ValueError(f"table {self.name}: qr_op={self.qr_op!r}; use one of {QR_OPS}")
        if self.qr_buckets < 0 or self.width < 1:
            raise ValueError(f"table {self.name}: qr_buckets and width must be positive")

    @property
    def qr(self) -> bool:
        return self.qr_buckets > 0

    @property
    def projected_in(self) -> int:
        """Input width of the projection to ``dim`` (0: none, the pooled vector is used)."""
        combined = 2 * self.width if self.qr and self.qr_op == "concat" else self.width
        return 0 if combined == self.dim else combined

    @property
    def factorized(self) -> bool:
        return self.qr or self.width != self.dim

    def stored(self) -> list[StoredTable]:
        """The tables the collection holds for this one."""
        if not self.qr:
            return [StoredTable(self.name, self.rows, self.width, list(self.feature_names))]
        m = self.qr_buckets
        return [
            StoredTable(
                self.name + QUOTIENT,
                math.ceil(self.rows / m),
                self.width,
                [f + QUOTIENT for f in self.feature_names],
            ),
            StoredTable(
                self.name + REMAINDER,
                m,
                self.width,
                [f + REMAINDER for f in self.feature_names],
                remainder_of=self.qr_op,
            ),
        ]

    def stored_params(self) -> int:
        """Parameters stored for this table: rows of its tables plus its projection."""
        return sum(t.rows * t.dim for t in self.stored()) + self.projected_in * self.dim


@dataclass(frozen=True)
class StoredTable:
    """A table the collection holds (``remainder_of``: the QR op of a ``_r`` table)."""

    name: str
    rows: int
    dim: int
    feature_names: list[str] = field(default_factory=list)
    remainder_of: str = ""


def stored_configs(
    specs: Sequence[FactorSpec], data_type: DataType = DataType.FP32
) -> list[EmbeddingBagConfig]:
    """torchrec configs of every stored table. A ``mul`` remainder table starts near 1
    (uniform in [0.5, 1.5]), so the product starts near the quotient's row."""
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    configs = []
    for spec in specs:
        for t in spec.stored():
            init = (
                partial(torch.nn.init.uniform_, a=0.5, b=1.5) if t.remainder_of == "mul" else None
            )
            configs.append(
                EmbeddingBagConfig(
                    data_type=data_type,
                    name=t.name,
                    num_embeddings=t.rows,
                    embedding_dim=t.dim,
                    feature_names=list(t.feature_names),
                    pooling=pooling[str(spec.pooling)],
                    init_fn=init,
                )
            )
    return configs


def _split_ids(
    buckets: dict[str, int], keys: Sequence[str], ids: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor]:
    m = torch.tensor([buckets.get(k, 1) for k in keys], dtype=ids.dtype, device=ids.device)
    per_bag = m.view(-1, 1).expand(len(keys), lengths.shape[0] // len(keys))
    per_id = per_bag.reshape(-1).repeat_interleave(lengths, output_size=ids.shape[0])
    return torch.cat([ids // per_id, ids % per_id]), torch.cat([lengths, lengths])


def _lookup_keys(buckets: dict[str, int], keys: Sequence[str]) -> list[str]:
    first = [k + QUOTIENT if k in buckets else k for k in keys]
    return first + [k + REMAINDER for k in keys]


def split_qr_kjt(kjt: KeyedJaggedTensor, buckets: tuple[tuple[str, int], ...]) -> KeyedJaggedTensor:
    """The lookup's KJT for QR ``buckets`` ((feature, m) pairs), see the module docstring.

    A leaf for torch.fx (``torch.fx.wrap``): torchrec's train pipeline traces the
    model and cannot trace into a KJT's keys.
    """
    by_key = dict(buckets)
    ids, lengths = _split_ids(by_key, kjt.keys(), kjt.values(), kjt.lengths())
    per_key = kjt.length_per_key_or_none()  # reused if torchrec already computed it
    return KeyedJaggedTensor(
        keys=_lookup_keys(by_key, kjt.keys()),
        values=ids,
        lengths=lengths,
        stride=kjt.stride(),
        length_per_key=None if per_key is None else per_key + per_key,
    )


torch.fx.wrap("split_qr_kjt")


class Factorized(nn.Module):
    """The steps around the lookup of factorized tables (module docstring).

    :meth:`split_kjt` (training) and :meth:`split_ids` (serving, plain tensors)
    derive the lookup's ids; :meth:`combine` maps the stored tables' pooled
    outputs (by feature) to each model feature's ``dim``-wide vector. The
    projections are ``proj[<table>]``.
    """

    def __init__(self, specs: Sequence[FactorSpec], *, device: torch.device | None = None) -> None:
        super().__init__()
        self.specs = list(specs)
        self.proj = nn.ModuleDict(
            {
                s.name: nn.Linear(s.projected_in, s.dim, bias=False, device=device)
                for s in self.specs
                if s.projected_in
            }
        )
        self.buckets = {f: s.qr_buckets for s in self.specs if s.qr for f in s.feature_names}

    @property
    def any_qr(self) -> bool:
        return bool(self.buckets)

    def lookup_keys(self, keys: Sequence[str]) -> list[str]:
        """The lookup KJT's keys for input ``keys`` (input unchanged without QR)."""
        return _lookup_keys(self.buckets, keys) if self.any_qr else list(keys)

    def split_ids(self, keys: Sequence[str], ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids, lengths)`` of the lookup's KJT (keys :meth:`lookup_keys`) from the
        input's (feature-major, ``len(keys) * B`` lengths); on device, no host sync."""
        if not self.any_qr:
            return ids, lengths
        return _split_ids(self.buckets, keys, ids, lengths)

    def split_kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The lookup's KJT (module docstring); ``kjt`` itself without QR tables."""
        if not self.any_qr:
            return kjt
        return split_qr_kjt(kjt, tuple(self.buckets.items()))

    def combine(self, pooled: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each model feature's ``[B, dim]`` vector from the stored features' pooled ones."""
        out = {}
        for spec in self.specs:
            for f in spec.feature_names:
                if spec.qr:
                    q, r = pooled[f + QUOTIENT], pooled[f + REMAINDER]
                    if spec.qr_op == "mul":
                        x = q * r
                    elif spec.qr_op == "add":
                        x = q + r
                    else:
                        x = torch.cat([q, r], dim=1)
                else:
                    x = pooled[f]
                out[f] = self.proj[spec.name](x) if spec.projected_in else x
        return out

    def stored_feature_dims(self) -> dict[str, int]:
        """Width of each stored feature's pooled output."""
        return {f: t.dim for s in self.specs for t in s.stored() for f in t.feature_names}
