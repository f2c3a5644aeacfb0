"""Defaults study: which optimizer settings learn within one epoch of a small set.

Issue 21 ("defaults that train in a short run"): on 8k rows of Criteo-format logs
the default dense Adam (lr 1e-3) barely moves the MLPs in one epoch. This trains
each *arm* (a set of ``optim.*`` overrides) for one epoch of each *dataset*, in
this process, and beside them a logistic regression on the same hashed one-hot
features (dense, their squares, one column per table row; the best of a few
``C`` on the eval rows, so an optimistic baseline). The datasets:

- ``synthetic_30`` / ``synthetic_300``: ``data=synthetic`` (the planted model),
  30 and 300 steps of 256;
- ``planted_8k`` / ``planted_50k``: the planted TSV round trip
  (benchmarks/planted_to_tsv.py, then ``prepare``), 8192 and 51200 rows;
- ``wide_16k``: planted Criteo files of another shape: the large tables at
  100k-200k rows (most ids seen once or never in 16k rows);
- ``dense_32k``: planted files where the dense features carry most of the signal
  (small tables, strong dense and non-linear terms): the MLPs must learn;
- ``movielens``: MovieLens-100k (``data=movielens``, 90k train rows), from
  ``--movielens DIR`` (ml-100k.inter/.user/.item, e.g. from the recbole wheel);
  skipped when absent;
- ``default_job`` (only when named): ``python -m trainer``'s job, 2000 steps of
  1024, no baseline (its oracle AUC is the bound).

Writes ``OUT/defaults.csv`` (a row per run, appended as runs finish: a rerun
skips the rows it has) and ``OUT/defaults.md`` (mean AUC over seeds per dataset
and arm, the best arm of each dataset in bold).

Example::

    python -m benchmarks.studies.defaults --out outputs/defaults
    python -m benchmarks.studies.defaults --out outputs/defaults --datasets default_job \\
        --arms old,default
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from benchmarks.planted_to_tsv import prepare_overrides, write_planted_tsv
from trainer.config.compose import CONF_DIR
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs, to_config
from trainer.config.validate import open_source
from trainer.data import SyntheticDataConfig
from trainer.data.data_configs import JoinConfig
from trainer.prepare import prepare
from trainer.train import train

BATCH = 256
QUIET = ["trainer.progress_bar=false", "trainer.plot=false", "trainer.resume=null"]
OLD = [
    "optim.embedding_lr=0.05",
    "optim.dense_lr=0.001",
    "optim.dense_warmup_steps=0",
    "optim.dense_lr_schedule=constant",
]
# name -> optim overrides on top of the old default (OLD); "default": conf/optim as is.
ARMS: dict[str, list[str]] = {
    "old": [],
    "default": [],
    "d3e-3": ["optim.dense_lr=0.003"],
    "d1e-2": ["optim.dense_lr=0.01"],
    "d3e-2": ["optim.dense_lr=0.03"],
    "d1e-2_w20": ["optim.dense_lr=0.01", "optim.dense_warmup_steps=20"],
    "d3e-2_w20": ["optim.dense_lr=0.03", "optim.dense_warmup_steps=20"],
    "d1e-2_w20_cos": [
        "optim.dense_lr=0.01",
        "optim.dense_warmup_steps=20",
        "optim.dense_lr_schedule=cosine",
    ],
    "d1e-2_cos": ["optim.dense_lr=0.01", "optim.dense_lr_schedule=cosine"],
    "d3e-2_cos": ["optim.dense_lr=0.03", "optim.dense_lr_schedule=cosine"],
    "old_e0.1": ["optim.dense_lr=0.001", "optim.embedding_lr=0.1"],
    "d1e-2_e0.1": ["optim.dense_lr=0.01", "optim.embedding_lr=0.1"],
    "d3e-2_e0.1": ["optim.dense_lr=0.03", "optim.embedding_lr=0.1"],
    "d3e-2_w20_e0.1": [
        "optim.dense_lr=0.03",
        "optim.dense_warmup_steps=20",
        "optim.embedding_lr=0.1",
    ],
}
_DEFAULT_NOTE = {"old": "the old default (" + " ".join(OLD) + ")", "default": "conf/optim as is"}
LR_C = (0.01, 0.03, 0.1, 0.3, 1.0)
WIDE = [1460, 583, 200000, 100000, 305, 24, 12517, 633, 10, 90000, 5683, 200000, 3194]
WIDE += [27, 14992, 200000, 10, 5652, 2173, 10, 200000, 18, 15, 100000, 105, 140000]


# In table order; default_job runs only when named.
DATASETS = [
    "synthetic_30",
    "planted_8k",
    "wide_16k",
    "dense_32k",
    "planted_50k",
    "synthetic_300",
    "movielens",
    "default_job",
]


@dataclass
class Dataset:
    """One data set: its ``data=`` overrides, the steps of one epoch, its seeds."""

    name: str
    overrides: list[str]
    num_steps: int
    batch_size: int = BATCH
    seeds: int = 1
    oracle_auc: float | None = None
    baseline: bool = True


def compose_config(overrides: list[str]) -> Any:
    """The repo's conf/ composed with ``overrides``, as typed dataclasses."""
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def _planted(work: Path, name: str, num_train: int, data: SyntheticDataConfig) -> Dataset:
    """Planted clicks written as Criteo TSV and prepared (once; reused when present)."""
    out = work / name
    if not (out / "shards").is_dir():
        info = write_planted_tsv(out, num_train=num_train, num_eval=16384, data=data)
        cfg = compose_config(prepare_overrides(out, info["table_rows"]))
        prepare(OmegaConf.to_object(cfg.data), progress=False)
    info = json.loads((out / "planted.json").read_text())
    overrides = prepare_overrides(out, info["table_rows"])
    overrides = [o for o in overrides if not o.startswith(("data.raw", "data.eval_raw"))]
    return Dataset(name, overrides, num_train // BATCH, oracle_auc=info["oracle_auc"])


def _movielens(work: Path, raw: Path) -> Dataset:
    """MovieLens-100k as conf/data/movielens.yaml reads it (a rating >= 4 is a click)."""
    out = work / "movielens"
    overrides = ["data=movielens", f"data.dir={out}", f"data.raw=[{raw / 'ml-100k.inter'}]"]
    if not out.is_dir():
        c = OmegaConf.to_object(compose_config(overrides).data)
        c.joins = [
            JoinConfig(raw=str(raw / "ml-100k.user"), on="user_id"),
            JoinConfig(raw=str(raw / "ml-100k.item"), on="item_id"),
        ]
        prepare(c, progress=False)
    return Dataset("movielens", overrides, 90_000 // BATCH)


def datasets(work: Path, names: list[str], movielens: Path | None) -> Iterator[Dataset]:
    """The named data sets, written and prepared under ``work`` the first time."""
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "synthetic_30":
            yield Dataset(name, ["data=synthetic"], 30, seeds=2)
        elif name == "synthetic_300":
            yield Dataset(name, ["data=synthetic"], 300)
        elif name == "planted_8k":
            ds = _planted(work, name, 8192, SyntheticDataConfig())
            yield dataclasses.replace(ds, seeds=2)
        elif name == "planted_50k":
            yield _planted(work, name, 51200, SyntheticDataConfig())
        elif name == "wide_16k":
            ds = _planted(work, name, 16384, SyntheticDataConfig(cardinalities=WIDE, seed=1))
            yield ds
        elif name == "dense_32k":
            shape = SyntheticDataConfig(
                cardinalities=[1460, 583, 305, 24, 633, 10, 27, 105, 18, 15, 2173, 3194, 10] * 2,
                dense_scale=1.2,
                dense_nonlinear_scale=0.8,
                first_order_scale=0.2,
                num_interactions=2,
                seed=2,
            )
            yield _planted(work, name, 32768, shape)
        elif name == "movielens":
            if movielens is None or not (movielens / "ml-100k.inter").is_file():
                logging.warning("movielens: no ml-100k files (--movielens DIR); skipped")
                continue
            yield _movielens(work, movielens)
        elif name == "default_job":
            yield Dataset(name, ["data=synthetic"], 2000, batch_size=1024, baseline=False)
        else:
            raise SystemExit(f"unknown dataset {name!r}")


def one_hot(batches: Iterator[Any], source: Any, limit: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Dense, dense squared and one column per table row (the model's hashed ids)."""
    sizes = {f.name: f.num_embeddings for f in source.features}
    offsets = dict(zip(sizes, np.cumsum([0, *list(sizes.values())[:-1]]), strict=True))
    blocks, labels = [], []
    for batch in batches:
        n = batch.labels.shape[0]
        dense = batch.dense_features.numpy()
        rows, cols = [], []
        for key in batch.sparse_features.keys():
            jt = batch.sparse_features[key]
            rows.append(np.repeat(np.arange(n), jt.lengths().numpy()))
            cols.append(jt.values().numpy() + offsets[key])
        r, c = np.concatenate(rows), np.concatenate(cols)
        ids = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, sum(sizes.values())))
        blocks.append(sp.hstack([sp.csr_matrix(np.hstack([dense, dense**2])), ids]))
        labels.append(batch.labels.numpy())
    x, y = sp.vstack(blocks).tocsr()[:limit], np.concatenate(labels)[:limit]
    return x, y


def logistic_auc(cfg: Any, ds: Dataset) -> tuple[float, float]:
    """The best eval AUC of a logistic regression over ``LR_C`` and its ``C``."""
    source = open_source(cfg.data, seed=cfg.trainer.seed)
    train_batches = source.train_batches(
        batch_size=ds.batch_size, rank=0, world_size=1, first_step=0, num_steps=ds.num_steps
    )
    x, y = one_hot(train_batches, source, ds.num_steps * ds.batch_size)
    eval_batches = source.eval_batches(batch_size=4096, rank=0, world_size=1)
    x_eval, y_eval = one_hot(eval_batches, source, source.num_eval_samples)
    best = (0.0, 0.0)
    with threadpool_limits(1):
        for c in LR_C:
            model = LogisticRegression(C=c, max_iter=300).fit(x, y)
            best = max(best, (roc_auc_score(y_eval, model.predict_proba(x_eval)[:, 1]), c))
    return best


FIELDS = ["dataset", "arm", "seed", "steps", "batch_size", "auc", "logloss", "oracle_auc"]
FIELDS += ["lr_auc", "lr_c", "seconds"]


def run_study(out: Path, ds_list: list[Dataset], arms: list[str]) -> list[dict[str, Any]]:
    """Trains every arm on every data set (seeds as the data set says); appends the CSV."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "defaults.csv"
    rows = read_rows(path)
    done = {(r["dataset"], r["arm"], int(r["seed"])) for r in rows}
    baselines = {(r["dataset"], int(r["seed"])): (r["lr_auc"], r["lr_c"]) for r in rows}
    for ds in ds_list:
        for seed in range(ds.seeds):
            for arm in arms:
                if (ds.name, arm, seed) in done:
                    continue
                trainer = [
                    f"trainer.num_steps={ds.num_steps}",
                    f"trainer.batch_size={ds.batch_size}",
                    f"trainer.eval_every_steps={ds.num_steps}",
                    f"trainer.seed={seed}",
                    "trainer.num_threads=1",
                ]
                optim = [] if arm == "default" else [*OLD, *ARMS[arm]]
                cfg = to_config(compose_config([*ds.overrides, *trainer, *QUIET, *optim]))
                if ds.baseline and (ds.name, seed) not in baselines:
                    baselines[(ds.name, seed)] = logistic_auc(cfg, ds)
                start = time.perf_counter()
                summary = train(cfg, run_dir=out / "runs" / f"{ds.name}-{arm}-{seed}")
                lr_auc, lr_c = baselines.get((ds.name, seed), ("", ""))
                row = {
                    "dataset": ds.name,
                    "arm": arm,
                    "seed": seed,
                    "steps": ds.num_steps,
                    "batch_size": ds.batch_size,
                    "auc": summary["auc"],
                    "logloss": summary["logloss"],
                    "oracle_auc": summary.get("oracle_auc", ds.oracle_auc or ""),
                    "lr_auc": lr_auc,
                    "lr_c": lr_c,
                    "seconds": round(time.perf_counter() - start, 1),
                }
                append_row(path, row)
                rows.append(row)
                print(f"{ds.name} {arm} seed {seed}: auc {row['auc']:.4f} (LR {lr_auc})")
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The CSV's rows so far (none when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One run's row, the header first when the file is new."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Mean AUC per data set (rows) and arm (columns); the best arm in bold."""
    seen = set(r["dataset"] for r in rows)
    names = [n for n in DATASETS if n in seen] + sorted(seen - set(DATASETS))
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    head = ["data set", "steps x batch", "seeds", "LR (best C)", "oracle", *arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        mine = [r for r in rows if r["dataset"] == name]
        aucs = {
            a: statistics.mean(float(r["auc"]) for r in mine if r["arm"] == a)
            for a in arms
            if any(r["arm"] == a for r in mine)
        }
        best = max(aucs.values())
        lrs = {(r["seed"], r["lr_auc"]) for r in mine if r["lr_auc"] not in ("", None)}
        lr = f"{statistics.mean(float(v) for _, v in lrs):.4f}" if lrs else "-"
        oracle = mine[0]["oracle_auc"]
        cells = [
            name,
            f"{mine[0]['steps']} x {mine[0]['batch_size']}",
            str(len({int(r["seed"]) for r in mine})),
            lr,
            f"{float(oracle):.4f}" if oracle not in ("", None) else "-",
        ]
        for a in arms:
            text = f"{aucs[a]:.4f}" if a in aucs else "-"
            cells.append(f"**{text}**" if a in aucs and aucs[a] == best else text)
        lines.append("| " + " | ".join(cells) + " |")
    short = [r for r in rows if r["dataset"] != "default_job"]
    lr_rows = {(r["dataset"], r["seed"]): float(r["lr_auc"]) for r in short if r["lr_auc"]}
    lr_sets = {n: statistics.mean(v for (m, _), v in lr_rows.items() if m == n) for n, _ in lr_rows}
    lr_mean = f"{statistics.mean(lr_sets.values()):.4f}" if lr_sets else "-"
    cells = ["mean, one-epoch sets", "", "", lr_mean, ""]
    for a in arms:  # over the data sets every arm of the table ran on
        per_set = {
            n: statistics.mean(
                float(r["auc"]) for r in short if r["dataset"] == n and r["arm"] == a
            )
            for n in {r["dataset"] for r in short if r["arm"] == a}
        }
        common = [
            n
            for n in per_set
            if all(any(r["dataset"] == n and r["arm"] == b for r in short) for b in arms)
        ]
        cells.append(f"{statistics.mean(per_set[n] for n in common):.4f}" if common else "-")
    lines.append("| " + " | ".join(cells) + " |")
    legend = ", ".join(f"`{a}`: {' '.join(ARMS[a]) or _DEFAULT_NOTE[a]}" for a in arms)
    return "\n".join(lines) + "\n\nArms: " + legend + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="defaults.csv/.md go here")
    parser.add_argument("--work", type=Path, help="generated data (default: OUT/data)")
    parser.add_argument("--datasets", default=",".join(DATASETS[:-1]))
    parser.add_argument("--arms", default=",".join(a for a in ARMS if a != "default"))
    parser.add_argument("--movielens", type=Path, help="a folder with ml-100k.inter/.user/.item")
    parser.add_argument("--seeds", type=int, help="seeds per data set (default: its own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    names, arms = args.datasets.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(ARMS)}")
    ds_list = list(datasets(args.work or args.out / "data", names, args.movielens))
    if args.seeds:
        ds_list = [dataclasses.replace(ds, seeds=args.seeds) for ds in ds_list]
    rows = run_study(args.out, ds_list, arms)
    (args.out / "defaults.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
