"""The quality study's shared split and its logistic-regression baselines.

Every model in the quality table (benchmarks/studies/quality.py) must see the
same rows: the first ``num_steps x batch_size`` training rows of a data source
in the order the trainer reads them, and its whole eval set. :func:`read_split`
reads them once, as the model sees them (dense features after the data set's
transform, ids already hashed or mapped into table rows), into :class:`Rows`.

Two logistic regressions on those hashed ids:

- :func:`train_logistic`: one epoch in torch, the way a CTR library trains one
  (a dim-1 ``EmbeddingBag`` over every table's rows + a linear of the dense
  features + a bias, Adagrad, the same batches in the same order);
- :func:`fit_logistic`: scikit-learn's lbfgs to convergence on the same rows
  (dense, dense squared, one column per table row), the best ``C`` picked on
  the eval rows: an optimistic bound, not a one-epoch model.

Example::

    train, held_out = read_split(source, num_steps=32, batch_size=256)
    auc, logloss = train_logistic(train, held_out, lr=0.1, batch_size=256)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from threadpoolctl import threadpool_limits
from torchrec.datasets.utils import Batch

from trainer.data.source import DataSource

SKLEARN_C = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class Rows:
    """Samples as the model sees them: ``ids[f]`` holds ``lengths[f]`` ids per sample."""

    dense: np.ndarray  # [N, num_dense] float32
    ids: dict[str, np.ndarray]  # feature -> concatenated ids (table rows)
    lengths: dict[str, np.ndarray]  # feature -> [N] ids per sample
    labels: np.ndarray  # [N] 0/1
    table_rows: dict[str, int]  # feature -> rows of its table

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def columns(self) -> sp.csr_matrix:
        """One column per table row (features side by side in ``table_rows`` order)."""
        offsets = np.cumsum([0, *list(self.table_rows.values())[:-1]])
        rows = [np.repeat(np.arange(self.num_samples), self.lengths[f]) for f in self.table_rows]
        cols = [self.ids[f] + o for f, o in zip(self.table_rows, offsets)]
        r, c = np.concatenate(rows), np.concatenate(cols)
        shape = (self.num_samples, sum(self.table_rows.values()))
        return sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=shape)


def read_rows(batches: Iterable[Batch], table_rows: dict[str, int], limit: int) -> Rows:
    """The first ``limit`` samples of ``batches`` (torchrec ``Batch``es) as :class:`Rows`."""
    dense, labels = [], []
    ids: dict[str, list[np.ndarray]] = {f: [] for f in table_rows}
    lengths: dict[str, list[np.ndarray]] = {f: [] for f in table_rows}
    for batch in batches:
        dense.append(batch.dense_features.float().numpy())
        labels.append(batch.labels.numpy())
        for f in table_rows:
            jt = batch.sparse_features[f]
            ids[f].append(jt.values().numpy())
            lengths[f].append(jt.lengths().numpy())
    n = min(limit, sum(len(y) for y in labels))
    all_lengths = {f: np.concatenate(v)[:n] for f, v in lengths.items()}
    return Rows(
        dense=np.concatenate(dense)[:n],
        ids={f: np.concatenate(v)[: all_lengths[f].sum()].astype(np.int64) for f, v in ids.items()},
        lengths=all_lengths,
        labels=np.concatenate(labels)[:n].astype(np.float32),
        table_rows=dict(table_rows),
    )


def read_split(source: DataSource, *, num_steps: int, batch_size: int) -> tuple[Rows, Rows]:
    """One epoch's training rows (as the trainer's steps read them) and the eval rows."""
    table_rows = {f.name: f.num_embeddings for f in source.features}
    train = source.train_batches(
        batch_size=batch_size, rank=0, world_size=1, first_step=0, num_steps=num_steps
    )
    held_out = source.eval_batches(batch_size=4096, rank=0, world_size=1)
    return (
        read_rows(train, table_rows, num_steps * batch_size),
        read_rows(held_out, table_rows, source.num_eval_samples),
    )


class HashedLogistic(torch.nn.Module):
    """A weight per table row (a dim-1 ``EmbeddingBag``), a linear of the dense, a bias."""

    def __init__(self, num_columns: int, num_dense: int) -> None:
        super().__init__()
        self.weights = torch.nn.EmbeddingBag(num_columns, 1, mode="sum")
        torch.nn.init.zeros_(self.weights.weight)
        self.dense = torch.nn.Linear(num_dense, 1) if num_dense else None
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(
        self, dense: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        logit = self.weights(cols, offsets).squeeze(1) + self.bias
        return logit if self.dense is None else logit + self.dense(dense).squeeze(1)


def _batch(x: sp.csr_matrix, dense: np.ndarray, a: int, b: int) -> tuple[torch.Tensor, ...]:
    start, stop = x.indptr[a], x.indptr[b]
    cols = torch.from_numpy(x.indices[start:stop].astype(np.int64))
    offsets = torch.from_numpy((x.indptr[a:b] - start).astype(np.int64))
    return torch.from_numpy(dense[a:b]), cols, offsets


def train_logistic(
    train: Rows, held_out: Rows, *, lr: float, batch_size: int, seed: int = 0
) -> tuple[float, float]:
    """Eval (AUC, log loss) of :class:`HashedLogistic` after one Adagrad epoch of ``train``."""
    torch.manual_seed(seed)
    x, x_eval = train.columns(), held_out.columns()
    model = HashedLogistic(x.shape[1], train.dense.shape[1])
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    labels = torch.from_numpy(train.labels)
    for a in range(0, train.num_samples, batch_size):
        b = min(a + batch_size, train.num_samples)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(*_batch(x, train.dense, a, b)), labels[a:b]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(model(*_batch(x_eval, held_out.dense, 0, held_out.num_samples)))
    return scores(held_out.labels, p.numpy())


def fit_logistic(train: Rows, held_out: Rows) -> tuple[float, float, float]:
    """scikit-learn's logistic regression, the best of ``SKLEARN_C`` on the eval rows.

    Returns (AUC, log loss, C). Features: dense, dense squared, one column per table row.
    """

    def features(r: Rows) -> sp.csr_matrix:
        dense = sp.csr_matrix(np.hstack([r.dense, r.dense**2]))
        return sp.hstack([dense, r.columns()]).tocsr()

    x, x_eval = features(train), features(held_out)
    best = (0.0, 0.0, 0.0)
    with threadpool_limits(1):
        for c in SKLEARN_C:
            model = LogisticRegression(C=c, max_iter=300).fit(x, train.labels)
            auc, ll = scores(held_out.labels, model.predict_proba(x_eval)[:, 1])
            best = max(best, (auc, ll, c))
    return best


def scores(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """(AUC, log loss) of predicted click probabilities."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(roc_auc_score(labels, p)), float(log_loss(labels, p, labels=[0, 1]))
