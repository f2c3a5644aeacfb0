"""The command line's config, composed before Hydra runs the app: a mistake is one line.

Hydra reports a compose error (unknown key, wrong type, unknown enum value, a
group option that does not exist) in several lines and exits 1. :func:`exit_on_compose_error`
composes the command line's config the way Hydra does (every job of a ``-m``
sweep, with the sweeper's own params) and turns the first mistake into one
line, ``shardrec: config error: ...`` naming the key and the allowed values,
and exit status 2. ``python -m trainer.plan`` and a ``-m`` sweep call it before
Hydra runs (no job of a sweep starts on a config that one of them cannot
compose); a single ``python -m trainer`` run, each rank of a torchrun job,
calls it only when Hydra's own compose failed (:class:`HydraRaises`), so a
config that composes is composed once less (about a second of CPU per
process). A config that composes goes on to Hydra unchanged, so ``-m``,
``--cfg job`` and ``hydra/launcher=...`` behave as before. An optuna search
(``hydra/sweeper=optuna``, ``+sweep=search/lr``) has no job list before it
runs: the check composes its corners instead, every parameter at its lowest
and at its highest value.

Example::

    exit_on_compose_error(["sharding=row_wsie"])
    # stderr: shardrec: config error: sharding=row_wsie: conf/sharding/ has no option
    #         'row_wsie'; choose one of auto, column_wise, ... ; exit status 2
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer.config.run_dir import register_resolvers
from trainer.config.schema import Config, ConfigError, register_configs, to_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EXIT_CONFIG_ERROR = 2
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA_SWEEPERS = ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",)


def one_line(message: object) -> str:
    """Any message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(message).split())


def config_error_line(err: BaseException) -> str:
    return f"shardrec: config error: {one_line(err)}"


def exit_on_compose_error(argv: Sequence[str], *, config_name: str = "config") -> None:
    """Prints one line and exits 2 when ``argv``'s config does not compose."""
    try:
        check_compose(argv, config_name=config_name)
    except ConfigError as err:
        print(config_error_line(err), file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def composes_up_front(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a sweep (``-m``, or ``hydra.mode`` set on the command line):
    its jobs are composed and checked before the first one starts."""
    args, _ = get_args_parser().parse_known_args(list(argv))
    return bool(args.multirun) or any("hydra.mode" in o for o in args.overrides)


class HydraRaises:
    """While Hydra composes, it raises its errors (``HYDRA_FULL_ERROR``) instead of
    printing them, so that the caller can turn a compose mistake into one line with
    :func:`exit_on_compose_error`; from :meth:`task_starts` on, Hydra reports the
    task's errors its usual way again (the user's ``HYDRA_FULL_ERROR`` back)."""

    def __init__(self) -> None:
        self.task_started = False
        self._previous: str | None = None

    def __enter__(self) -> HydraRaises:
        self._previous = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        return self

    def task_starts(self) -> None:
        if not self.task_started:
            self.task_started = True
            self._restore()

    def __exit__(self, *exc: object) -> None:
        if not self.task_started:
            self._restore()

    def _restore(self) -> None:
        if self._previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = self._previous


def check_compose(argv: Sequence[str], *, config_name: str = "config") -> None:
    """Composes the config of ``argv`` (each job of a sweep) and converts it to the
    typed dataclasses, as the run will; raises :class:`ConfigError` on the first
    mistake. Options Hydra handles itself (``--help``, ``--info``, another
    ``--config-dir``...) skip the check."""
    args, unknown = get_args_parser().parse_known_args(list(argv))
    if unknown or args.help or args.hydra_help or args.shell_completion or args.info:
        return  # Hydra prints its help or its own usage error
    if args.config_path or args.config_dir or args.experimental_rerun:
        return  # another config tree than conf/: Hydra composes it
    config_name = args.config_name or config_name
    register_configs()
    register_resolvers()
    overrides: list[str] = list(args.overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None

            def compose(job_overrides: list[str], mode: RunMode) -> DictConfig:
                try:
                    return hydra.compose_config(
                        config_name, job_overrides, run_mode=mode, with_log_configuration=False
                    )
                except (HydraException, OmegaConfBaseException) as err:
                    raise ConfigError(explain(err, job_overrides)) from None

            cfg = compose(overrides, RunMode.MULTIRUN if args.multirun else RunMode.RUN)
            multirun = args.multirun or OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN
            if multirun and not args.multirun:
                cfg = compose(overrides, RunMode.MULTIRUN)
            if not multirun:
                _convert(cfg, overrides)
            for job in _sweep_jobs(cfg, overrides) if multirun else []:
                _convert(compose(job, RunMode.RUN), job)
    finally:
        GlobalHydra.instance().clear()


def _convert(cfg: DictConfig, overrides: list[str]) -> Config:
    """The typed dataclasses, as the entry point makes them (:func:`typed_config`)."""
    return typed_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), overrides)


def typed_config(task: DictConfig, overrides: Sequence[str]) -> Config:
    """The task's config (no ``hydra`` node) as typed dataclasses; a mistake (a
    missing or mistyped value, a ``+key`` the schema has no field for) raises
    :class:`ConfigError` naming the key."""
    try:
        typed = to_config(task)
    except OmegaConfBaseException as err:
        raise ConfigError(explain(err, overrides)) from None
    for key, known in _added_keys(typed, ""):
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {parent}.{close[0]}?" if close else ""
        raise ConfigError(
            f"+{key}: no such key in {parent or 'the config'}{hint} (keys: {', '.join(known)})"
        )
    return typed


def _added_keys(node: Any, prefix: str) -> list[tuple[str, list[str]]]:
    """Keys a ``+key=value`` added to a schema node: the schema ignores them silently."""
    if isinstance(node, dict):
        return [k for name, v in node.items() for k in _added_keys(v, f"{prefix}{name}.")]
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return []
    known = [f.name for f in dataclasses.fields(node)]
    found = [(f"{prefix}{name}", known) for name in vars(node) if name not in known]
    for name in known:
        found += _added_keys(getattr(node, name), f"{prefix}{name}.")
    return found


def _sweep_jobs(cfg: DictConfig, overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them (hydra overrides first);
    for an optuna sweeper, its corner jobs (:func:`_optuna_corner_jobs`)."""
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_")
    if sweeper in OPTUNA_SWEEPERS:
        return _optuna_corner_jobs(cfg, overrides)
    if sweeper != BASIC_SWEEPER:
        return []  # another sweeper composes its own jobs
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += [o.input_line for o in parsed if not o.is_hydra_override()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [hydra_overrides + list(job) for batch in batches for job in batch]


def _optuna_corner_jobs(cfg: DictConfig, overrides: list[str]) -> list[list[str]]:
    """Two jobs of an optuna search: each parameter at its low end (first choice) and
    at its high end (last choice), written as the plugin writes a trial's overrides."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += [o.input_line for o in parsed if not o.is_hydra_override()]
    try:
        space, fixed = create_params_from_overrides(arguments)
    except (HydraException, ValueError, AssertionError) as err:
        raise ConfigError(f"hydra.sweeper.params: {one_line(err)}") from None
    jobs = []
    for end in (0, -1):
        point = {name: _optuna_end(dist, end) for name, dist in space.items()}
        point.update({k: v for k, v in fixed.items() if k not in point})
        jobs.append(hydra_overrides + [f"{name}={value}" for name, value in point.items()])
    return jobs


def _optuna_end(distribution: Any, end: int) -> Any:
    """A distribution's first (``end=0``) or last (``end=-1``) value."""
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return choices[end]
    return distribution.low if end == 0 else distribution.high


def explain(err: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's or OmegaConf's error as one line naming the key and what is allowed."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        missing = err.missing_cfg_file  # e.g. sharding/row_wsie, experiment/compression/nope
        given = next((o for o in overrides if missing.startswith(f"{_key_of(o)}/")), None)
        group = _key_of(given) if given else missing.rpartition("/")[0]
        options = _group_options(group) or [
            o for o in err.options or [] if not o.endswith("_schema")
        ]
        if group and options:
            return (
                f"{given or missing}: conf/{group}/ has no option "
                f"{missing[len(group) + 1 :]!r}; choose one of {', '.join(options)}"
            )
    if isinstance(err, OverrideParseException):
        bad = _unparsable(overrides)
        reason = str(err).splitlines()[0]
        return (
            f"{bad or 'the command line'}: cannot be parsed ({reason}); quote lists and "
            f"dicts for the shell, e.g. 'data.hotness=[1,2]'"
        )
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return _unknown_key(key, cause, overrides)
        first = str(cause).splitlines()[0]
        value = next((o.split("=", 1)[1] for o in overrides if _key_of(o) == key), None)
        return f"{key}={value}: {first}" if value is not None else f"{key}: {first}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    return "; ".join(lines) or type(err).__name__


def _group_options(group: str) -> list[str]:
    """The options of a config group of conf/ (nested ones as ``compression/bf16``)."""
    folder = CONF_DIR / group
    if group.startswith("hydra") or not folder.is_dir():
        return []  # Hydra's own groups: Hydra's list
    return sorted(
        str(p.relative_to(folder).with_suffix(""))
        for p in folder.rglob("*.yaml")
        if not p.stem.endswith("_schema")
    )


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _unparsable(overrides: Sequence[str]) -> str | None:
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


def _unknown_key(key: str, cause: OmegaConfBaseException, overrides: Sequence[str] = ()) -> str:
    parent, _, name = key.rpartition(".")
    known = _field_names(getattr(cause, "object_type", None))
    where = f"{parent}" if parent else "the config"
    if not known:
        added = any(o.startswith("+") and _key_of(o) in (key, parent) for o in overrides)
        if getattr(cause, "object_type", None) is dict and not added:  # e.g. data.buckets
            return f"{key}: no such key in {where} yet; add a key to a dict with +{key}=VALUE"
        return f"{key}: no such key in {where}"
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    return f"{key}: no such key in {where}{hint} (keys: {', '.join(known)})"


def _field_names(object_type: Any) -> list[str]:
    if isinstance(object_type, type) and dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    return []
