"""Hyperparameter search: Optuna trials that prune themselves on their intermediate evals.

``hydra/sweeper=optuna`` (hydra-optuna-sweeper) asks the study for a trial, runs
the job with the trial's params as overrides, and tells the study the value
the task returned (``trainer/__main__.py`` returns the final eval AUC). It
gives the job no trial object, so it cannot prune, and Hydra loads sweepers
only from the ``hydra_plugins`` package, so no subclass can add it. Instead:

* the search sweeps (``conf/sweep/search/*.yaml``) set the plugin's own hook,
  ``hydra.sweeper.custom_search_space: trainer.search.tag_trial``: it writes on
  each trial, as the sweeper asks it, the sweep directory and the job number
  the trial is about to run as (user attributes ``sweep_dir``, ``job_num``);
* :class:`MakeSweepDir` (``hydra.callbacks``) makes the sweep directory first,
  where the SQLite study goes;
* in the job, :func:`pruning_from_hydra` opens the study in the sweeper's storage
  (SQLite file or PostgreSQL: ``hydra.sweeper.storage``), finds its running
  trial by those two, and returns a :class:`TrialPruning`: the loop calls it with
  each intermediate eval; it reports the AUC to the trial and asks the pruner
  (median, after ``SHARDREC_PRUNER_STARTUP_TRIALS`` finished trials;
  ``SHARDREC_PRUNER=none`` turns pruning off). When the pruner says stop, the run
  ends after that eval; its summary says ``stopped_early: pruned ...``.

The plugin then tells the trial ``COMPLETE`` with the AUC the run reached (it
cannot tell ``PRUNED``, and a trial the job finished itself would end the
sweep with an error): a pruned trial is ``COMPLETE`` with user attribute
``pruned`` true, which the sweep report shows as ``PRUNED``.

Example::

    python -m trainer -m +sweep=search/lr hydra.sweeper.n_trials=20
    python -m trainer -m +sweep=search/lr hydra/launcher=slurm \\
        hydra.sweeper.storage=postgresql://user:pw@host/db      # trials on several machines
    python -m trainer.report multirun/search_lr/<date_time>     # trials, best, importances
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

TAG_TRIAL = "trainer.search.tag_trial"  # hydra.sweeper.custom_search_space
PRUNER_ENV = "SHARDREC_PRUNER"  # median (default) or none
STARTUP_ENV = "SHARDREC_PRUNER_STARTUP_TRIALS"  # complete trials before any pruning
WARMUP_ENV = "SHARDREC_PRUNER_WARMUP_STEPS"  # no pruning before this step
PRUNED_ATTR = "pruned"  # the trial's user attribute the job sets
_asked: dict[int, int] = {}  # trials asked so far, by sweep (the sweeper's config object)


def tag_trial(cfg: DictConfig, trial: optuna.trial.Trial) -> None:
    """The sweeper's ``custom_search_space`` hook, called for each trial in the order
    of its job numbers: marks the trial with the sweep directory and job number."""
    num = _asked.get(id(cfg), 0)
    _asked[id(cfg)] = num + 1
    trial.set_user_attr("sweep_dir", str(cfg.hydra.sweep.dir))
    trial.set_user_attr("job_num", num)


class MakeSweepDir(Callback):
    """``hydra.callbacks``: the sweep directory exists before the sweeper opens the
    study in it (``sqlite:///<sweep dir>/optuna.db``; the launcher makes it later)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)


def find_trial(study: optuna.study.Study, *, sweep_dir: str, job_num: int) -> int | None:
    """The number of the running trial :func:`tag_trial` marked with this job."""
    from optuna.trial import TrialState

    numbers = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("sweep_dir") == sweep_dir and t.user_attrs.get("job_num") == job_num
    ]
    return max(numbers, default=None)


class TrialPruning:
    """The loop's ``on_eval``: reports each eval's AUC to the trial, says when to stop.

    Called on rank 0 only (the loop agrees the stop over ranks; the study is opened
    on the first call); returns ``None`` to go on, or the reason the run stops.
    """

    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        sweep_dir: str,
        job_num: int,
        pruner: optuna.pruners.BasePruner,
    ) -> None:
        self.storage, self.study_name = storage, study_name
        self.sweep_dir, self.job_num = sweep_dir, job_num
        self.pruner = pruner
        self._trial: optuna.trial.Trial | None = None
        self._missing = False

    def trial(self) -> optuna.trial.Trial | None:
        """This job's trial (``None``, once warned, when the study has none for it)."""
        if self._trial is None and not self._missing:
            import optuna

            store = optuna.storages.get_storage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=store, pruner=self.pruner)
            number = find_trial(study, sweep_dir=self.sweep_dir, job_num=self.job_num)
            if number is None:
                self._missing = True
                log.warning("no running optuna trial for job %d: no pruning", self.job_num)
                return None
            study_id = store.get_study_id_from_name(self.study_name)
            trial_id = store.get_trial_id_from_study_id_trial_number(study_id, number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        auc = metrics.get("auc")
        trial = self.trial()
        if auc is None or trial is None:
            return None
        trial.report(float(auc), step)
        if not trial.should_prune():
            return None
        trial.set_user_attr(PRUNED_ATTR, True)
        trial.set_user_attr("pruned_at_step", step)
        log.info("optuna trial %d pruned at step %d (auc %.4f)", trial.number, step, auc)
        return f"pruned: optuna trial {trial.number} at step {step}"


def make_pruner(environ: dict[str, str] | None = None) -> optuna.pruners.BasePruner:
    """The study's pruner from the job's environment (the sweep file's env_set)."""
    import optuna

    env = os.environ if environ is None else environ
    kind = env.get(PRUNER_ENV, "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind != "median":
        raise ValueError(f"{PRUNER_ENV}={kind}: choose median or none")
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(env.get(STARTUP_ENV, "2")),
        n_warmup_steps=int(env.get(WARMUP_ENV, "0")),
    )


def pruning_from_hydra() -> TrialPruning | None:
    """The running job's :class:`TrialPruning`, or ``None`` outside a pruning search
    (another sweeper, no :func:`tag_trial` hook, or a study in memory, which no job
    shares)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    sweeper = hydra_cfg.sweeper
    if sweeper.get("custom_search_space") != TAG_TRIAL:
        return None
    storage, study_name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage or not study_name:
        log.warning("optuna sweep without storage or study name: no pruning")
        return None
    return TrialPruning(
        storage=str(storage),
        study_name=str(study_name),
        sweep_dir=str(hydra_cfg.sweep.dir),
        job_num=int(hydra_cfg.job.num),
        pruner=make_pruner(),
    )
