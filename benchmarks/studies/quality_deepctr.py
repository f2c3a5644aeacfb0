"""DeepCTR-Torch's models on the quality study's split (optional: not a shardrec dependency).

DeepCTR-Torch (``deepctr_torch``) is installed outside the project, e.g.::

    pip install --target /tmp/deepctr-pkgs deepctr-torch==0.3.0 --no-deps
    PYTHONPATH=/tmp/deepctr-pkgs python -m benchmarks.studies.quality ...

(its dependencies, torch, scikit-learn and tqdm, are already in shardrec's
environment; ``requests`` only for its version check). :func:`available` says
whether it imports; nothing here imports it at module import time.

The inputs are the :class:`~benchmarks.studies.quality_data.Rows` every model
of the study sees: one ``SparseFeat`` per single-id feature, a
``VarLenSparseFeat`` (sum, padded) per multi-id feature, one ``DenseFeat`` per
dense column. Ids are shifted by one because DeepCTR masks id 0 as padding.
Its ``fit`` trains one epoch in the rows' order (``shuffle=False``), Adam at
``lr``; everything else is DeepCTR's default except the embedding dim (16, as
shardrec's ``model.embedding_dim``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from benchmarks.studies.quality_data import Rows, scores

MODELS = ("DeepFM", "DCN", "WDL")
EMBEDDING_DIM = 16


def available() -> bool:
    """Whether ``deepctr_torch`` can be imported (installed outside the project)."""
    return importlib.util.find_spec("deepctr_torch") is not None


def _inputs(rows: Rows, max_len: dict[str, int]) -> dict[str, np.ndarray]:
    """DeepCTR's input dict: ids + 1 (0 pads), [N, max_len] for multi-id features."""
    x: dict[str, np.ndarray] = {}
    for f, lengths in rows.lengths.items():
        ids = rows.ids[f] + 1
        if max_len[f] == 1:
            x[f] = ids
            continue
        padded = np.zeros((rows.num_samples, max_len[f]), dtype=np.int64)
        pos = np.arange(ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = pos < max_len[f]
        padded[np.repeat(np.arange(rows.num_samples), lengths)[keep], pos[keep]] = ids[keep]
        x[f] = padded
    for i in range(rows.dense.shape[1]):
        x[f"dense_{i}"] = rows.dense[:, i]
    return x


def train_deepctr(
    name: str, train: Rows, held_out: Rows, *, lr: float, batch_size: int, seed: int = 0
) -> tuple[float, float]:
    """Eval (AUC, log loss) of DeepCTR-Torch's ``name`` after one epoch of ``train``."""
    from deepctr_torch import models
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    single = {
        f: bool((train.lengths[f] == 1).all() and (held_out.lengths[f] == 1).all())
        for f in train.lengths
    }
    max_len = {f: 1 if single[f] else int(max(train.lengths[f].max(), 1)) for f in train.lengths}
    columns: list = []
    for f, rows in train.table_rows.items():
        feat = SparseFeat(f, vocabulary_size=rows + 1, embedding_dim=EMBEDDING_DIM)
        columns.append(
            feat if single[f] else VarLenSparseFeat(feat, maxlen=max_len[f], combiner="sum")
        )
    columns += [DenseFeat(f"dense_{i}", 1) for i in range(train.dense.shape[1])]
    torch.manual_seed(seed)
    model = getattr(models, name)(columns, columns, task="binary", device="cpu", seed=seed)
    model.compile(torch.optim.Adam(model.parameters(), lr=lr), "binary_crossentropy")
    model.fit(
        _inputs(train, max_len),
        train.labels,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    p = model.predict(_inputs(held_out, max_len), batch_size=4096)
    return scores(held_out.labels, p.ravel())
