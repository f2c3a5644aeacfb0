"""``train(cfg)``: build everything in one documented order, train, always tear down.

The set-up is a :func:`trainer.session.session` (validation, process group,
the sharded model, the ``Trainer``, resume; see its module docstring for the
order); then:

1. the loop (checkpointing every ``trainer.checkpoint_every_steps``);
2. the export (``trainer.export``): the serving bundle, on rank 0;
3. ``summary.json``, written once.

With ``online.days`` the same session walks the days of a drifting stream
instead (trainer/online/days.py).

Example::

    summary = train(cfg, run_dir=Path("outputs/demo"))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.builder.budget import apply_budget
from trainer.config.schema import Config
from trainer.export.step import export_step
from trainer.online.days import walk
from trainer.online.follow import follow
from trainer.session import session


def train(
    cfg: Config,
    *,
    run_dir: Path,
    on_eval: Callable[[int, dict[str, float]], str | None] | None = None,
) -> dict[str, Any]:
    """Runs one training job; returns the summary (also written to ``summary.json``).

    ``on_eval``: the loop's hook after each intermediate eval (``Trainer``); a
    search's pruning (trainer/search.py) ends a trial early through it.
    """
    if cfg.budget.ratio:  # the size budget chooses each table's form first
        cfg = apply_budget(cfg, run_dir=run_dir)
    if cfg.online.days:  # the day walk: evaluate, then train, day after day
        return walk(cfg, run_dir=run_dir)
    if cfg.online.follow:  # train a dataset's partitions as they arrive
        return follow(cfg, run_dir=run_dir)
    with session(cfg, run_dir=run_dir, on_eval=on_eval) as s:
        s.resume()
        summary = s.trainer.fit(extra=s.extra())
        summary.update(s.built.converters.summary())  # again: what training reached (pruning)
        if cfg.trainer.checkpoint_every_steps:
            summary.update(s.checkpointer.stats())
        if cfg.trainer.export:  # the quantized serving model, on rank 0
            summary["export"] = export_step(
                s.built.model,
                model_config=cfg.model,
                converters=s.built.converters,
                tables=s.built.tables,
                source=s.trainer.source,
                eval_batch_size=cfg.trainer.eval_batch_size,
                run_dir=s.run_dir,
                data_config=cfg.data,  # described in the bundle's schema.json
            )
        return s.finish(summary)
