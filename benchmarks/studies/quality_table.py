"""The quality study's CSV rows and the markdown tables made from them.

A row is one run: ``system`` names it as ``family@setting`` (``lr_1ep@0.1``,
``deepctr_DeepFM@0.001``, ``shardrec_deepfm@default``, ``lr_fit``).
:func:`markdown` writes two tables:

1. the **quality table**: per data set, the one-epoch logistic regression (best
   rate), the converged one (best ``C``), DeepCTR-Torch's best, each shardrec
   model with its default settings, and the issue's target: shardrec's best
   default model minus the logistic regression (>= 0 wanted) and minus
   DeepCTR-Torch's (>= -0.005 wanted), compared on equal terms: default against
   default (DeepCTR's Adam at 1e-3, its ``compile("adam")``), and best of the
   same number of settings against best of as many (shardrec's settings named
   by ``best_of``, else all it ran; DeepCTR's Adam rates; "-" when the counts
   differ);
2. **best of a few**: each model's best AUC over its settings, the setting named.

With several seeds (the ``seed`` column), each system's AUC and log loss are its
mean over its seeds (:func:`mean_over_seeds`): settings are picked on the mean,
never on a lucky seed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

FIELDS = ["dataset", "system", "steps", "batch_size", "auc", "logloss", "note", "oracle_auc"]
FIELDS += ["seconds", "seed"]
DEEPCTR_DEFAULT_LR = "0.001"  # torch.optim.Adam's default, what compile("adam") gives
TARGET_DEEPCTR = -0.005


def append_row(path: Path, row: dict[str, Any], fields: list[str] = FIELDS) -> None:
    """One run's row, the header first when the file is new."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data set, system): AUC and log loss averaged over its seeds,
    ``seeds`` their number (a row without ``seed`` is seed 0)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["system"]), []).append(r)
    merged = []
    for runs in groups.values():
        losses = [float(r["logloss"]) for r in runs if r.get("logloss") not in ("", None)]
        merged.append(
            {
                **runs[0],
                "auc": sum(float(r["auc"]) for r in runs) / len(runs),
                "logloss": sum(losses) / len(losses) if losses else float("nan"),
                "seeds": len({r.get("seed") or 0 for r in runs}),
            }
        )
    return merged


def _best(rows: list[dict[str, Any]], prefix: str) -> tuple[float, str, float] | None:
    """(AUC, system, log loss) of the best row whose system starts with ``prefix``."""
    mine = [r for r in rows if r["system"].startswith(prefix)]
    if not mine:
        return None
    r = max(mine, key=lambda r: float(r["auc"]))
    return float(r["auc"]), r["system"], float(r["logloss"])


def _settings(rows: list[dict[str, Any]], prefix: str) -> set[str]:
    return {r["system"].partition("@")[2] for r in rows if r["system"].startswith(prefix)}


def _cell(best: tuple[float, str, float] | None, name: bool = True) -> str:
    if best is None:
        return "-"
    auc, system, _ = best
    setting = system.partition("@")[2]
    return f"{auc:.4f} ({setting})" if name and setting else f"{auc:.4f}"


def _named(best: tuple[float, str, float] | None) -> str:
    """AUC (DeepCTR model@lr)."""
    return f"{best[0]:.4f} ({best[1].removeprefix('deepctr_')})" if best else "-"


def _gap(value: float, wanted: float) -> str:
    text = f"{value:+.4f}"
    return text if value >= wanted else f"**{text}**"


def datasets_in(rows: list[dict[str, Any]]) -> list[str]:
    """Data set names in first-seen order (those with a trained model: not only ``lr_fit``)."""
    return list(dict.fromkeys(r["dataset"] for r in rows if r["system"] != "lr_fit"))


def quality_table(rows: list[dict[str, Any]], best_of: list[str] | None = None) -> str:
    """Table 1: default settings against the baselines, and the target's two gaps;
    ``best_of``: shardrec's settings its best of n is taken over (None: all)."""
    models = ["dlrm", "dlrm_dcnv2", "deepfm", "wide_deep"]
    head = ["data set", "steps x batch", "oracle", "LR 1 epoch (lr)", "LR fit (C)"]
    head += ["DeepCTR default", "DeepCTR best", *models, "seeds", "shardrec - LR"]
    head += ["shardrec - DeepCTR (default)", "shardrec - DeepCTR (best of n)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in datasets_in(rows):
        mine = [r for r in rows if r["dataset"] == name]
        lr = _best(mine, "lr_1ep@")
        fit = [r for r in mine if r["system"] == "lr_fit"]
        deep_default = _best(
            [r for r in mine if r["system"].endswith("@" + DEEPCTR_DEFAULT_LR)], "deepctr_"
        )
        deep = _best(mine, "deepctr_")
        defaults = {m: _best(mine, f"shardrec_{m}@default") for m in models}
        found = [v for v in defaults.values() if v]
        best = max(found) if found else None
        tried = [
            r
            for r in mine
            if not r["system"].startswith("shardrec_")
            or best_of is None
            or r["system"].partition("@")[2] in best_of
        ]
        n = len(_settings(tried, "shardrec_"))
        best_n = _best(tried, "shardrec_") if n == len(_settings(mine, "deepctr_")) else None
        oracle = mine[0].get("oracle_auc") or ""
        cells = [
            name,
            f"{mine[0]['steps']} x {mine[0]['batch_size']}",
            f"{float(oracle):.4f}" if oracle else "-",
            _cell(lr),
            f"{float(fit[0]['auc']):.4f} ({fit[0]['note'].removeprefix('C=')})" if fit else "-",
            _named(deep_default),
            _named(deep),
        ]
        for m in models:
            text = _cell(defaults[m], name=False)
            cells.append(f"**{text}**" if best and defaults[m] == best else text)
        cells.append(str(max(int(r.get("seeds", 1)) for r in mine)))
        cells.append(_gap(best[0] - lr[0], 0.0) if best and lr else "-")
        default_gap = best and deep_default and _gap(best[0] - deep_default[0], TARGET_DEEPCTR)
        cells.append(default_gap or "-")
        best_gap = best_n and deep and _gap(best_n[0] - deep[0], TARGET_DEEPCTR)
        cells.append(f"{best_gap} (n={n})" if best_gap else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_of_table(rows: list[dict[str, Any]]) -> str:
    """Table 2: every model's best AUC over its settings (log loss of that run)."""
    families = list(dict.fromkeys(r["system"].partition("@")[0] for r in rows))
    families = [f for f in families if f != "lr_fit"]
    head = ["data set", *families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in datasets_in(rows):
        mine = [r for r in rows if r["dataset"] == name]
        cells = [name]
        for f in families:
            best = _best(mine, f + "@")
            cells.append(f"{_cell(best)} / {best[2]:.4f}" if best else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], best_of: list[str] | None = None) -> str:
    """Both tables, with a line saying how to read each (AUCs: means over seeds);
    ``best_of``: shardrec's settings for the best of n (None: all it ran)."""
    rows = mean_over_seeds(rows)
    over = f" (shardrec's n: {', '.join(best_of)})" if best_of else ""
    return (
        "AUC on each data set's eval rows after one epoch, the mean over the seeds "
        "counted; shardrec with its default settings; gaps: shardrec's best default "
        "model minus the one-epoch logistic regression (target >= 0) and minus "
        "DeepCTR-Torch's (target >= -0.005): its best model at its default rate, and "
        f"best of n settings against best of n (n rates each){over}, missed targets "
        "in bold.\n\n"
        + quality_table(rows, best_of)
        + "\nBest of a few settings: AUC (setting) / log loss.\n\n"
        + best_of_table(rows)
    )
