"""Quality study: shardrec's models against a logistic regression and DeepCTR-Torch.

Issue 21's quality table: on each data set the study can make or get here,
every model trains **one epoch** (the same ``steps x 256`` training rows in the
same order) and is scored on the same eval rows:

- ``shardrec_<model>@<setting>``: ``python -m trainer``'s ``train()`` with
  ``model=dlrm|dlrm_dcnv2|deepfm|wide_deep``; ``default`` is conf/ as it is,
  ``d1e-2``/``d1e-1`` set ``optim.dense_lr``, ``e2e-2`` the tables' rate
  ``optim.embedding_lr`` (the "best of a few": ``--best-of`` picks as many as
  DeepCTR-Torch has rates);
- ``lr_1ep@<lr>``: a logistic regression on the same hashed ids (a weight per
  table row + a linear of the dense), one Adagrad epoch in torch;
- ``lr_fit``: scikit-learn's logistic regression fitted to convergence, best
  ``C`` on the eval rows (optimistic: not a one-epoch model);
- ``deepctr_<DeepFM|DCN|WDL>@<lr>``: DeepCTR-Torch, one epoch of its ``fit``
  with Adam at ``lr`` (1e-3 is its default), only when ``deepctr_torch``
  imports (installed outside the project; see quality_deepctr.py); skipped with
  a message otherwise.

The data sets are the defaults study's (benchmarks/studies/defaults.py):
planted TSV round trips prepared with ``data=criteo``, planted Criteo files of
other shapes, ``data=synthetic`` and MovieLens-100k (``--movielens DIR``).
``--seeds 0,1,2`` runs every system with each trainer seed (the rows' order and
the initialization; DeepCTR-Torch and the logistic regression get the same
order and seed), so every family has the same settings and seeds; the tables
average each system over its seeds. Writes ``OUT/quality.csv`` (a row per run,
appended; a rerun skips what it has) and ``OUT/quality.md`` (the tables,
quality_table.py).

Example::

    PYTHONPATH=/tmp/deepctr-pkgs python -m benchmarks.studies.quality --out outputs/quality \\
        --datasets planted_8k,movielens --movielens /tmp/ml-100k
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.studies import quality_deepctr
from benchmarks.studies.defaults import QUIET, Dataset, compose_config, datasets
from benchmarks.studies.defaults import read_rows as read_csv
from benchmarks.studies.quality_data import Rows, fit_logistic, read_split, train_logistic
from benchmarks.studies.quality_table import FIELDS, append_row, markdown
from trainer.config.schema import to_config
from trainer.config.validate import open_source
from trainer.train import train

DATASETS = ["planted_8k", "wide_16k", "dense_32k", "planted_50k", "synthetic_300", "movielens"]
SHARDREC_MODELS = ("dlrm", "dlrm_dcnv2", "deepfm", "wide_deep")
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "d1e-2": ["optim.dense_lr=0.01"],
    "d1e-1": ["optim.dense_lr=0.1"],
    # the table rate (row-wise Adagrad, default 0.05): shardrec's other learning rate
    "e2e-2": ["optim.embedding_lr=0.02"],
}
LR_RATES = (0.03, 0.1, 0.3)
DEEPCTR_RATES = (0.001, 0.003, 0.01)


def systems(settings: list[str], deepctr: bool) -> list[str]:
    """Every run of one data set, by name (``family_model@setting``)."""
    names = [f"lr_1ep@{lr:g}" for lr in LR_RATES] + ["lr_fit"]
    if deepctr:
        names += [f"deepctr_{m}@{lr:g}" for m in quality_deepctr.MODELS for lr in DEEPCTR_RATES]
    names += [f"shardrec_{m}@{s}" for m in SHARDREC_MODELS for s in settings]
    return names


def trainer_overrides(ds: Dataset, seed: int) -> list[str]:
    """One epoch of ``ds`` (eval once, at the end), one thread; ``seed`` orders the
    rows (prepared shards) and initializes the model."""
    return [
        f"trainer.num_steps={ds.num_steps}",
        f"trainer.batch_size={ds.batch_size}",
        f"trainer.eval_every_steps={ds.num_steps}",
        f"trainer.seed={seed}",
        "trainer.num_threads=1",
        *QUIET,
    ]


def run_one(
    name: str, ds: Dataset, split: Callable[[], tuple[Rows, Rows]], out: Path, seed: int
) -> dict:
    """Trains and scores one system on ``ds`` with ``seed``: its CSV row."""
    family, _, setting = name.partition("@")
    note = ""
    if family == "lr_1ep":
        auc, logloss = train_logistic(*split(), lr=float(setting), batch_size=ds.batch_size)
    elif family == "lr_fit":
        auc, logloss, c = fit_logistic(*split())
        note = f"C={c:g}"
    elif family.startswith("deepctr_"):
        model = family.removeprefix("deepctr_")
        auc, logloss = quality_deepctr.train_deepctr(
            model, *split(), lr=float(setting), batch_size=ds.batch_size, seed=seed
        )
    else:
        model = family.removeprefix("shardrec_")
        overrides = [*ds.overrides, f"model={model}", *trainer_overrides(ds, seed)]
        run_dir = out / "runs" / f"{ds.name}-{name}-{seed}"
        summary = train(
            to_config(compose_config([*overrides, *SETTINGS[setting]])), run_dir=run_dir
        )
        auc, logloss = summary["auc"], summary["logloss"]
    return {"auc": auc, "logloss": logloss, "note": note}


def run_study(
    out: Path, ds_list: list[Dataset], names: list[str], seeds: list[int]
) -> list[dict[str, Any]]:
    """Every system on every data set with every seed; appends ``OUT/quality.csv`` as
    runs finish. ``lr_fit`` (order-free, the slowest) runs with the first seed only."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quality.csv"
    rows = read_csv(path)
    done = {(r["dataset"], r["system"], int(r.get("seed") or 0)) for r in rows}
    for ds, seed in ((ds, seed) for ds in ds_list for seed in seeds):
        cache: dict[str, tuple[Rows, Rows]] = {}

        def split(ds: Dataset = ds, cache: dict = cache, seed: int = seed) -> tuple[Rows, Rows]:
            if "rows" not in cache:  # the rows every baseline sees, read once per data set
                cfg = to_config(compose_config([*ds.overrides, *trainer_overrides(ds, seed)]))
                source = open_source(cfg.data, seed=cfg.trainer.seed)
                cache["rows"] = read_split(source, num_steps=ds.num_steps, batch_size=ds.batch_size)
            return cache["rows"]

        for name in names:
            if (ds.name, name, seed) in done or (name == "lr_fit" and seed != seeds[0]):
                continue
            start = time.perf_counter()
            result = run_one(name, ds, split, out, seed)
            row = {
                "dataset": ds.name,
                "system": name,
                "seed": seed,
                "steps": ds.num_steps,
                "batch_size": ds.batch_size,
                **result,
                "oracle_auc": ds.oracle_auc or "",
                "seconds": round(time.perf_counter() - start, 1),
            }
            append_row(path, row, FIELDS)
            rows.append(row)
            auc, logloss = float(row["auc"]), float(row["logloss"])
            print(f"{ds.name} {name} seed {seed}: auc {auc:.4f} logloss {logloss:.4f}")
    return rows


def reuse_fits(out: Path, defaults_csv: Path, names: list[str]) -> None:
    """``lr_fit`` rows from the defaults study's CSV (the same rows, features and C grid).

    scikit-learn's fit is the slowest baseline by far on the wide sets; the defaults
    study (benchmarks/studies/defaults.py) has computed it for seed 0 already.
    """
    path = out / "quality.csv"
    have = {(r["dataset"], r["system"]) for r in read_csv(path)}
    for r in read_csv(defaults_csv):
        if r["seed"] != "0" or not r["lr_auc"] or r["dataset"] not in names:
            continue
        if (r["dataset"], "lr_fit") not in have:
            have.add((r["dataset"], "lr_fit"))
            row = {"dataset": r["dataset"], "system": "lr_fit", "seed": 0, "steps": r["steps"]}
            row |= {"batch_size": r["batch_size"], "auc": r["lr_auc"], "logloss": ""}
            row |= {"note": f"C={float(r['lr_c']):g}; defaults study", "seconds": ""}
            append_row(path, {**row, "oracle_auc": r["oracle_auc"]}, FIELDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="quality.csv/.md go here")
    parser.add_argument("--work", type=Path, help="generated data (default: OUT/data)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="shardrec's settings")
    parser.add_argument(
        "--best-of", help="shardrec's settings for the best of n (default: all it ran)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated trainer seeds")
    parser.add_argument("--only", help="comma-separated system names (default: all)")
    parser.add_argument("--movielens", type=Path, help="a folder with ml-100k.inter/.user/.item")
    parser.add_argument("--fits-from", type=Path, help="lr_fit rows from a defaults.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    deepctr = quality_deepctr.available()
    if not deepctr:
        print(
            "deepctr_torch does not import: DeepCTR-Torch's models are skipped (quality_deepctr.py)"
        )
    names = systems(args.settings.split(","), deepctr)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    ds_list = list(
        datasets(args.work or args.out / "data", args.datasets.split(","), args.movielens)
    )
    if args.fits_from:
        args.out.mkdir(parents=True, exist_ok=True)
        reuse_fits(args.out, args.fits_from, [ds.name for ds in ds_list])
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = run_study(args.out, ds_list, names, seeds)
    best_of = args.best_of.split(",") if args.best_of else None
    (args.out / "quality.md").write_text(markdown(rows, best_of))
    print(markdown(rows, best_of))


if __name__ == "__main__":
    main()
