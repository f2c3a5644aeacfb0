"""The optuna part of a sweep report: trials, best settings, parameter importances.

A sweep run with ``hydra/sweeper=optuna`` (``+sweep=search/lr``) keeps its study in
the sweeper's storage (``hydra.sweeper.storage``: ``<sweep dir>/optuna.db`` or a
PostgreSQL server), named ``hydra.sweeper.study_name``; both are read from a
job's ``.hydra/hydra.yaml`` (``${hydra.sweep.dir}`` is the report's directory).
The section lists every trial (number, job, state, params, AUC; a trial its job
pruned, ``pruned`` user attribute, shows ``PRUNED``), the best trial, and each
parameter's importance (optuna's ``get_param_importances`` with the
mean-decrease-impurity evaluator: the default fANOVA one does not run on the
numpy this stack uses). :func:`sweep.write_report` appends it to report.md and
writes ``trials.csv``.

Example::

    study = find_study(Path("multirun/search_lr/2026-12-05_10-00-00"))
    if study is not None:
        print(to_markdown(study))  # "## optuna study search_lr ..." with the tables
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
SWEEP_DIR_REF = "${hydra.sweep.dir}"


def storage_of(sweep_dir: Path) -> tuple[str, str] | None:
    """(storage URL, study name) of the optuna sweep in ``sweep_dir``, else ``None``."""
    for hydra_yaml in sorted(Path(sweep_dir).glob("*/.hydra/hydra.yaml")):
        sweeper = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {}).get("sweeper")
        if not sweeper or "optuna" not in str(sweeper.get("_target_", "")):
            return None
        storage, name = sweeper.get("storage"), sweeper.get("study_name")
        if not storage or not name:
            return None  # a study in memory: gone with the sweep
        storage = str(storage).replace(SWEEP_DIR_REF, str(Path(sweep_dir).resolve()))
        return storage, str(name)
    return None


def find_study(sweep_dir: Path) -> optuna.study.Study | None:
    """The sweep's study, loaded from its storage; ``None`` for another sweeper."""
    found = storage_of(sweep_dir)
    if found is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, name = found
    return optuna.load_study(study_name=name, storage=storage)


def trial_state(trial: optuna.trial.FrozenTrial) -> str:
    """The trial's state; a trial its job pruned (told COMPLETE by the plugin) is PRUNED."""
    return "PRUNED" if trial.user_attrs.get("pruned") else trial.state.name


def trial_rows(study: optuna.study.Study) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per trial: number, job, state, each param, value."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    header = ["trial", "job", "state", *params, "auc"]
    rows = [
        [
            t.number,
            t.user_attrs.get("job_num", ""),
            trial_state(t),
            *(t.params.get(p, "") for p in params),
            t.value if t.value is not None else "",
        ]
        for t in trials
    ]
    return header, rows


def importances(study: optuna.study.Study) -> dict[str, float] | str:
    """Each parameter's importance for the AUC, or why there is none yet."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) < 2:
        return f"needs 2 finished trials, has {len(done)}"
    try:
        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError) as err:  # e.g. every param took one value
        return " ".join(str(err).split())


def best_trial(study: optuna.study.Study) -> optuna.trial.FrozenTrial | None:
    """The finished, unpruned trial of the highest (or lowest) AUC."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and not t.user_attrs.get("pruned")
    ]
    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    return max(done, key=lambda t: sign * float(t.value), default=None)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(study: optuna.study.Study) -> str:
    header, rows = trial_rows(study)
    states = [row[2] for row in rows]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    lines = [
        f"## optuna study {study.study_name}",
        "",
        f"{len(rows)} trials ({counts}), direction {study.direction.name.lower()}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    best = best_trial(study)
    if best is None:
        lines += ["", "best: none (no trial finished unpruned)"]
    else:
        settings = " ".join(f"{k}={_cell(v)}" for k, v in best.params.items())
        lines += ["", f"best: trial {best.number}, auc {best.value:.4f}: {settings}"]
    found = importances(study)
    lines += ["", "### parameter importance (mean decrease in impurity)", ""]
    if isinstance(found, str):
        lines.append(f"n/a: {found}")
    else:
        lines += ["| param | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in found.items()]
    return "\n".join(lines) + "\n"


def write_csv(study: optuna.study.Study, out: Path) -> Path:
    header, rows = trial_rows(study)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return out
