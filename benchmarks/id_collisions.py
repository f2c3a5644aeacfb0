"""Hashing against managed collision at equal table memory: AUC per day, collisions, misses.

Reads two finished day walks (``experiment=online/drift`` with
``model.id_management=hash`` and ``=managed_collision``, the same
``model.mc_zch_size``; see docs/online.md, "Managed collision") and prints one
row per day:

- ``auc``: the walk's next-day AUC (``days.jsonl``, evaluated before training on the day);
- hash ``collide``: the share of the day's eval lookups whose row (``id % rows``) is
  also looked up by another id that day;
- managed collision ``miss``: the share of the day's eval lookups whose id is not in
  the remap when the day is evaluated (never admitted, or evicted), so it reads the
  shared miss row; the remap is the checkpoint at the end of the previous day
  (``trainer.checkpoint_every_steps`` = the day's steps, ``checkpoint_keep`` >= days).

Day 0 meets an untrained model (nothing admitted yet): its miss share is 1.

Example::

    python -m benchmarks.id_collisions outputs/hash outputs/mc_lru
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trainer.checkpoint.load import load_unsharded_model
from trainer.config.saved import read_config
from trainer.config.tables import run_tables
from trainer.data import SyntheticSource
from trainer.models import build_model
from trainer.models.collision import IdManagedTables, id_management

EMPTY = torch.iinfo(torch.int64).max


def _days(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "days.jsonl").read_text().splitlines()]


def _eval_ids(cfg, day: int) -> dict[str, torch.Tensor]:
    """Per feature, the ids of day ``day``'s eval lookups."""
    source = SyntheticSource(cfg.data, day=day)
    batch = source.batch("eval", 0, cfg.data.num_eval_samples)
    return {k: jt.values() for k, jt in batch.sparse_features.to_dict().items()}


def collide_share(ids: dict[str, torch.Tensor], rows: int) -> float:
    """Share of lookups whose row ``id % rows`` another distinct id also reads."""
    hit = total = 0
    for values in ids.values():
        uniq, inverse = torch.unique(values, return_inverse=True)
        row_of = uniq % rows
        ids_per_row = torch.bincount(row_of, minlength=rows)
        hit += int((ids_per_row[row_of[inverse]] > 1).sum())
        total += values.numel()
    return hit / total


def _remap_at(run: Path, cfg, step: int) -> dict[str, torch.Tensor] | None:
    """Per table, the ids in the remap saved at ``step`` (None: no such checkpoint)."""
    path = run / "checkpoints" / f"step_{step}"
    if not path.exists():
        return None
    tables = run_tables(cfg, features=cfg.data.features)
    model = build_model(
        arch=cfg.model.arch,
        tables=tables.model,
        num_dense=cfg.data.num_dense,
        dense_arch_layer_sizes=cfg.model.dense_arch_layer_sizes,
        over_arch_layer_sizes=cfg.model.over_arch_layer_sizes,
        device=torch.device("cpu"),
        id_management=id_management(cfg.model),
    )
    load_unsharded_model(path, model)
    ebc = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, IdManagedTables)
    out = {}
    for table, m in ebc.remap_modules().items():
        ids = m._mch_sorted_raw_ids
        out[table] = ids[ids != EMPTY]
    return out


def miss_share(ids: dict[str, torch.Tensor], remap: dict[str, torch.Tensor] | None) -> float:
    """Share of lookups whose id is not in the remap (``t_<feature>`` tables)."""
    if remap is None:
        return 1.0
    miss = sum(int((~torch.isin(v, remap[f"t_{k}"])).sum()) for k, v in ids.items())
    return miss / sum(v.numel() for v in ids.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hash_run", type=Path)
    parser.add_argument("mc_run", type=Path)
    args = parser.parse_args()
    cfg_h = read_config(next((args.hash_run / "checkpoints").glob("step_*")))
    cfg_m = read_config(next((args.mc_run / "checkpoints").glob("step_*")))
    rows = cfg_h.model.mc_zch_size
    assert rows == cfg_m.model.mc_zch_size, "compare runs with the same model.mc_zch_size"
    hash_days, mc_days = _days(args.hash_run), _days(args.mc_run)
    print(
        "| day | oracle AUC | hash AUC | MC AUC | hash: lookups colliding | MC: lookups missing |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for h, m in zip(hash_days, mc_days):
        day = h["day"]
        ids = _eval_ids(cfg_h, day)
        collide = collide_share(ids, rows)
        miss = miss_share(ids, _remap_at(args.mc_run, cfg_m, m["step"]) if day else None)
        print(
            f"| {day} | {h['oracle_auc']:.4f} | {h['auc']:.4f} | {m['auc']:.4f} "
            f"| {collide:.1%} | {miss:.1%} |"
        )


if __name__ == "__main__":
    main()
