"""The size budget, trainer side: measure each table's sensitivity, choose, rewrite the config.

``budget.ratio=0.05`` (1/20 of the fp32 table bytes) makes the run choose, per
table, how it is stored and served before it trains:

1. a short **probe**: the configured model, unsharded, fp32, trained in this
   process for ``budget.probe_steps`` steps (at most ``trainer.num_steps``;
   dense Adam, row-wise Adagrad tables, the run's rates and batch size;
   deterministic, so every rank computes the same choice without talking);
2. **sensitivity**: for each table and each candidate, that table alone is
   replaced by what the candidate would serve, and the loss over the first
   ``budget.eval_batches`` eval batches is measured against the untouched
   model's. Candidates: int8 / int4 / int2 rows (FBGEMM's rounding); for
   tables of at least ``budget.min_rows`` rows also a low-rank table (rank
   ``dim/2``, ``dim/4``: the rows' truncated SVD, stored rows quantized, the
   fp32 ``rank x dim`` projection counted) and a quotient-remainder ``mul``
   split (``ceil(sqrt(rows))`` buckets, fitted to the trained rows by
   alternating least squares, both halves quantized);
3. **choice**: compression/budget.py's least-loss assignment whose served
   bytes (packed rows, projections) fit ``ratio`` x the fp32 table bytes;
   printed as a table and written to ``budget.json`` in the run directory;
4. the run's config gets the choice: ``model.tables`` with each table's
   ``rank`` / ``qr_buckets``, ``qat.table_bits`` for every stored table, so
   the real run trains quantization-aware at those bits and exports them.

A post-hoc approximation of a trained table is a pessimistic proxy for one
trained in that form from the start (QR and low-rank tables learn their own
rows), which is what the run then does.

Example::

    cfg = apply_budget(cfg, run_dir=run_dir)   # before the session builds anything
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression.budget import Candidate, choose, format_choice, row_bytes
from compression.fake_quant import fake_quantize_rows
from trainer.builder.model import build_unsharded
from trainer.config.schema import Config, ConfigError, TableConfig
from trainer.config.tables import resolved_tables, run_tables
from trainer.config.validate import open_source
from trainer.config.validate_compression import validate_budget
from trainer.data.source import DataSource

log = logging.getLogger(__name__)
BUDGET_FILE = "budget.json"
BITS = (8, 4, 2)


def _probe(cfg: Config, source: DataSource) -> nn.Module:
    """The configured model trained briefly, unsharded, in this process."""
    torch.manual_seed(cfg.trainer.seed)
    probe_tables = run_tables(cfg, features=source.features)
    model = build_unsharded(
        cfg.model, tables=probe_tables, num_dense=source.num_dense, device=torch.device("cpu")
    )
    ebc = model.model.sparse_arch.embedding_bag_collection
    tables = list(ebc.parameters())
    ids = {id(p) for p in tables}
    dense = torch.optim.Adam(
        [p for p in model.parameters() if id(p) not in ids], lr=cfg.optim.dense_lr
    )
    table_opt = RowWiseAdagrad(tables, lr=cfg.optim.embedding_lr, eps=cfg.optim.embedding_eps)
    batches = source.train_batches(  # any data source (was synthetic's batch() only)
        batch_size=cfg.trainer.batch_size,
        rank=0,
        world_size=1,
        first_step=0,
        num_steps=min(cfg.budget.probe_steps, cfg.trainer.num_steps),  # no longer than the run
    )
    model.train()
    for batch in batches:
        loss, _ = model(batch)
        dense.zero_grad()
        table_opt.zero_grad()
        loss.backward()
        dense.step()
        table_opt.step()
    return model.eval()


@torch.no_grad()
def _eval_loss(model: nn.Module, batches: list[Any]) -> float:
    return sum(float(model(b)[0]) for b in batches) / len(batches)


def _svd_rank(w: Tensor, rank: int, bits: int) -> Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    stored = fake_quantize_rows((u[:, :rank] * s[:rank]).contiguous(), bits)
    return stored @ vh[:rank]


def qr_fit(w: Tensor, buckets: int, *, iters: int = 10) -> tuple[Tensor, Tensor]:
    """``(Q [ceil(rows/m) x d], R [m x d])`` with ``Q[i // m] * R[i % m] ~ w[i]`` (least
    squares, alternating; ``m = buckets``)."""
    rows, dim = w.shape
    num_q = math.ceil(rows / buckets)
    full = torch.zeros(num_q * buckets, dim)
    mask = torch.zeros(num_q * buckets, 1)
    full[:rows], mask[:rows] = w, 1
    t, m = full.view(num_q, buckets, dim), mask.view(num_q, buckets, 1)
    r = torch.ones(buckets, dim)
    q = torch.zeros(num_q, dim)
    for _ in range(iters):
        q = (m * t * r).sum(1) / (m * r * r).sum(1).clamp(min=1e-12)
        r = (m * t * q[:, None]).sum(0) / (m * (q * q)[:, None]).sum(0).clamp(min=1e-12)
    return q, r


def _qr(w: Tensor, buckets: int, bits: int) -> Tensor:
    q, r = qr_fit(w, buckets)
    q, r = fake_quantize_rows(q, bits), fake_quantize_rows(r, bits)
    idx = torch.arange(w.shape[0])
    return q[idx // buckets] * r[idx % buckets]


def _candidates(t: TableConfig, min_rows: int) -> list[tuple[str, int, dict[str, Any], Any]]:
    """(choice, bytes, settings, approximation of the trained rows) of one table."""
    rows, dim, name = t.num_embeddings, t.embedding_dim, t.name
    out = []
    for bits in BITS:
        out.append(
            (
                f"int{bits}",
                rows * row_bytes(dim, bits),
                {"bits": {name: bits}},
                lambda w, b=bits: fake_quantize_rows(w, b),
            )
        )
    if rows < min_rows:
        return out
    for rank in (dim // 2, dim // 4):
        if rank < 4 or rank % 4:
            continue
        for bits in BITS:
            if rank * bits % 16:  # FBGEMM packs whole 2-byte words (rank 4 at int2 cannot)
                continue
            size = rows * row_bytes(rank, bits) + rank * dim * 4
            out.append(
                (
                    f"rank{rank}+int{bits}",
                    size,
                    {"rank": rank, "bits": {name: bits}},
                    lambda w, r=rank, b=bits: _svd_rank(w, r, b),
                )
            )
    m = math.ceil(math.sqrt(rows))
    for bits in BITS:
        size = (math.ceil(rows / m) + m) * row_bytes(dim, bits)
        settings = {"qr_buckets": m, "bits": {f"{name}_q": bits, f"{name}_r": bits}}
        out.append((f"qr{m}+int{bits}", size, settings, lambda w, mm=m, b=bits: _qr(w, mm, b)))
    return out


@torch.no_grad()
def measure(
    model: nn.Module, tables: list[TableConfig], batches: list[Any], *, min_rows: int
) -> dict[str, list[Candidate]]:
    """Each table's candidates with their measured sensitivity (eval loss increase)."""
    base = _eval_loss(model, batches)
    bags = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    out: dict[str, list[Candidate]] = {}
    for t in tables:
        weight = bags[t.name].weight
        original = weight.detach().clone()
        out[t.name] = []
        for choice, size, settings, approx in _candidates(t, min_rows):
            weight.copy_(approx(original))
            loss = _eval_loss(model, batches)
            out[t.name].append(Candidate(choice, size, loss - base, settings))
        weight.copy_(original)
    return out


def apply_budget(cfg: Config, *, run_dir: Path | None = None) -> Config:
    """A copy of ``cfg`` with the budget's per-table choice written in (module docstring)."""
    validate_budget(cfg)
    b = cfg.budget
    source = open_source(cfg.data, seed=cfg.trainer.seed)
    tables = resolved_tables(cfg.model, source.features)
    if any(t.rank or t.qr_buckets for t in tables) or cfg.model.table_rank or cfg.model.qr_min_rows:
        raise ConfigError(
            "budget.ratio chooses each table's rank and QR split itself; drop "
            "model.table_rank / qr_min_rows / tables[].rank / qr_buckets"
        )
    model = _probe(cfg, source)
    eval_iter = source.eval_batches(batch_size=cfg.trainer.eval_batch_size, rank=0, world_size=1)
    batches = [batch for _, batch in zip(range(b.eval_batches), eval_iter)]
    candidates = measure(model, tables, batches, min_rows=b.min_rows)
    fp32_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    budget_bytes = int(b.ratio * fp32_bytes)
    try:
        picked = choose(candidates, budget_bytes=budget_bytes)
    except ValueError as err:
        raise ConfigError(f"budget.ratio={b.ratio}: {err}") from None
    rows = {t.name: t.num_embeddings for t in tables}
    log.info("size budget: %s", "\n" + format_choice(picked, rows=rows, budget_bytes=budget_bytes))
    chosen = copy.deepcopy(cfg)
    chosen.model.tables = [
        TableConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=t.pooling,
            rank=picked[t.name].settings.get("rank", 0),
            qr_buckets=picked[t.name].settings.get("qr_buckets", 0),
            qr_op="mul" if picked[t.name].settings.get("qr_buckets") else "",
        )
        for t in tables
    ]
    chosen.qat.bits = 0
    chosen.qat.table_bits = {k: v for c in picked.values() for k, v in c.settings["bits"].items()}
    if run_dir is not None:
        report = {
            "ratio": b.ratio,
            "budget_bytes": budget_bytes,
            "fp32_bytes": fp32_bytes,
            "chosen_bytes": sum(c.bytes for c in picked.values()),
            "tables": {
                n: {
                    "rows": rows[n],
                    "choice": c.choice,
                    "bytes": c.bytes,
                    "sensitivity": c.sensitivity,
                }
                for n, c in picked.items()
            },
            "candidates": {
                n: [[c.choice, c.bytes, c.sensitivity] for c in cs] for n, cs in candidates.items()
            },
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / BUDGET_FILE).write_text(json.dumps(report, indent=1))
    return chosen
