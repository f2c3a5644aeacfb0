"""Docs that cannot go stale: every command shown in README.md and docs/ still works.

Collects the commands in the Markdown's fenced code blocks and inline code spans
(``python -m trainer``, ``python -m trainer.plan``, ``python -m trainer.prepare``,
``torchrun ... -m trainer``, ``sbatch scripts/slurm/train.sbatch`` and ``make``)
and checks each one without training:

- trainer, plan and prepare commands compose against the real ``conf/`` and convert
  to the typed schema (``check_compose``, as the entry points do; a ``-m`` sweep
  composes every job), then pass ``validate`` with the world size the command
  launches (``--nproc_per_node`` x ``--nnodes``; ``topology.world_size`` for the
  planner). Data that needs files on disk (``data=criteo``, ``table``, ...) is
  composed and schema-checked only;
- ``make X`` names a target of the Makefile (``make train ARGS=...`` also composes
  the ARGS); ``sbatch`` runs a script that exists.

Conventions for the docs (docs/architecture.md, "Commands in the docs"):

- ``<...>`` placeholders, and ``DIR``, ``CKPT``, ``HOST_A``, stand for things not in
  the repository; ``...`` is dropped. A command with a ``<...>`` placeholder is
  composed and schema-checked but not validated (it names files that do not exist).
- A fenced block whose info string has ``skip-check`` is not checked (a command
  shown failing on purpose).

Also: the README's config-group table lists every group and option of ``conf/``,
relative links and images in the Markdown resolve, and nothing points outside the
repository.

Example::

    .venv/bin/pytest -q -p no:cacheprovider tests/test_docs.py
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config.compose import CONF_DIR, ConfigError, _convert, _sweep_jobs, explain
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import Config, register_configs, to_config
from trainer.config.validate import validate
from trainer.data.synthetic_config import SyntheticDataConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MODULES = {"trainer", "trainer.plan", "trainer.prepare"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
TORCHRUNS = {"torchrun", ".venv/bin/torchrun"}
# make targets whose ARGS are overrides of a module (and the arguments the target adds).
MAKE_MODULES = {
    "train": ("trainer", []),
    "prepare": ("trainer.prepare", []),
    "compression-report": ("trainer", ["-m", "+sweep=precision_qat"]),
}
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
FENCE = re.compile(r"^(\s*)```(.*)$")
SHELLS = (["bash"], ["sh"], ["shell"], ["console"])  # fenced blocks checked, and unlabelled ones


@dataclass
class Command:
    where: str  # file:line
    text: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


def _shell_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Joins ``\\`` continuations; drops prompts (``$ ``)."""
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, raw in block:
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if pending is not None:
            number, line = pending[0], f"{pending[1]} {line}"
            pending = None
        if line.endswith("\\"):
            pending = (number, line[:-1].rstrip())
            continue
        lines.append((number, line))
    if pending is not None:
        lines.append(pending)
    return lines


def _snippets(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every fenced line (joined) and inline code span."""
    out: list[tuple[int, str]] = []
    block: list[tuple[int, str]] | None = None
    skip = False
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if fence and block is None:
            info = fence.group(2).split()
            block, skip = [], "skip-check" in info or info[:1] not in ([], *SHELLS)
            continue
        if fence and block is not None:
            if not skip:
                out += _shell_lines(block)
            block = None
            continue
        if block is not None:
            block.append((number, line))
        else:
            prose.append((number, line))
    # Inline spans may wrap a line: search paragraphs, report the span's first line.
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        index = next(i for i, s in enumerate(starts) if s > match.start()) - 1
        out.append((prose[index][0], " ".join(match.group(1).split())))
    return out


def _tokens(text: str) -> tuple[dict[str, str], list[str]] | None:
    """The environment assignments and argv of one shell command, or None."""
    text = PLACEHOLDER.sub("x", text)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    tokens = [t for t in tokens if t not in ("...", "&")]
    env: dict[str, str] = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    return (env, tokens) if tokens else None


def _is_command(argv: list[str]) -> bool:
    program = argv[0]
    if program in PYTHONS:
        return len(argv) >= 3 and argv[1] == "-m" and argv[2] in MODULES
    if program in TORCHRUNS:
        return "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["trainer"]
    # sbatch with a script, make with a target (not a bare mention of the tool)
    return program in ("sbatch", "make") and any(not a.startswith("-") for a in argv[1:])


def collect() -> list[Command]:
    commands = []
    for path in DOCS:
        for number, text in _snippets(path):
            parsed = _tokens(text)
            if parsed and _is_command(parsed[1]):
                where = f"{path.relative_to(ROOT)}:{number}"
                commands.append(Command(where, text, *parsed))
    return commands


COMMANDS = collect()


def _option(args: list[str], name: str) -> str | None:
    """``--name=V`` or ``--name V`` (underscores and dashes alike)."""
    names = {name, name.replace("_", "-"), name.replace("-", "_")}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in names:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _count(value: str | None, default: int = 1) -> int:
    """A process or node count: ``2``, or the largest of an elastic ``1:2``."""
    return int(value.split(":")[-1]) if value else default


@dataclass
class Launch:
    module: str
    overrides: list[str]
    world_size: int = 1
    local_world_size: int = 1


def _launch(cmd: Command) -> Launch | None:
    """What the command runs; None for a make target or script without overrides."""
    argv = cmd.argv
    program = argv[0]
    if program in PYTHONS:
        return Launch(argv[2], argv[3:])
    if program in TORCHRUNS:
        m = argv.index("-m")
        nproc = _count(_option(argv[1:m], "--nproc_per_node"))
        nnodes = _count(_option(argv[1:m], "--nnodes"))
        return Launch("trainer", argv[m + 2 :], nproc * nnodes, nproc)
    if program == "sbatch":
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        assert script is not None, f"{cmd.where}: sbatch without a script: {cmd.text}"
        assert (ROOT / script).is_file(), f"{cmd.where}: {script} does not exist"
        overrides = argv[argv.index(script) + 1 :]
        options = argv[1 : argv.index(script)]
        nodes = _count(_option(options, "--nodes"))
        if cmd.env.get("SHARDREC_LAUNCHER") == "srun":
            per_node = _count(_option(options, "--ntasks-per-node"))
        else:
            per_node = _count(
                cmd.env.get("SHARDREC_NPROC_PER_NODE") or _option(options, "--gpus-per-node")
            )
        return Launch("trainer", overrides, nodes * per_node, per_node)
    # make
    targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
    variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    missing = [t for t in targets if t not in MAKE_TARGETS]
    assert not missing, f"{cmd.where}: no make target {missing} in the Makefile: {cmd.text}"
    if len(targets) == 1 and targets[0] in MAKE_MODULES and "ARGS" in variables:
        module, extra = MAKE_MODULES[targets[0]]
        args = [a for a in shlex.split(variables["ARGS"]) if a != "..."]
        return Launch(module, extra + args)
    return None


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, flags=re.MULTILINE))


MAKE_TARGETS = _make_targets()


class Composer:
    """Composes command lines against conf/ in one Hydra context, as ``check_compose``
    does for the entry points (same errors), caching each job's typed config."""

    def __init__(self) -> None:
        register_configs()
        register_resolvers()
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
        self.hydra = GlobalHydra.instance().hydra
        self.cache: dict[tuple[str, ...], Config] = {}

    def compose(self, overrides: list[str], mode: RunMode) -> DictConfig:
        try:
            return self.hydra.compose_config(
                "config", overrides, run_mode=mode, with_log_configuration=False
            )
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(explain(err, overrides)) from None

    def job(self, overrides: list[str]) -> Config:
        """One job's typed config (unknown keys, wrong types, added keys: ConfigError)."""
        key = tuple(overrides)
        if key not in self.cache:
            cfg = self.compose(overrides, RunMode.RUN)
            _convert(cfg, overrides)
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            typed = to_config(task)  # the sections' dataclasses (the root's type is masked)
            self.cache[key] = Config(**typed) if isinstance(typed, dict) else typed
        return self.cache[key]

    def jobs(self, argv: list[str]) -> list[Config]:
        """The command line's jobs: one, or of a ``-m`` sweep enough jobs that every value
        of every axis is composed once (not the whole product: that is Hydra's loop)."""
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = list(args.overrides)
        if not args.multirun:
            return [self.job(overrides)]
        cfg = self.compose(overrides, RunMode.MULTIRUN)
        covering, seen = [], set()
        for job in _sweep_jobs(cfg, overrides) or [overrides]:
            if not seen.issuperset(job):
                covering.append(job)
                seen.update(job)
        return [self.job(job) for job in covering]


@pytest.fixture(scope="module")
def composer():
    yield Composer()
    GlobalHydra.instance().clear()


def check(cmd: Command, composer: Composer) -> None:
    launch = _launch(cmd)
    if launch is None:
        return
    try:
        configs = composer.jobs(launch.overrides)
    except ConfigError as err:
        raise AssertionError(f"{cmd.where}: {cmd.text}\n  config error: {err}") from None
    if launch.module == "trainer.prepare" or PLACEHOLDER.search(cmd.text):
        return  # prepare reads files; placeholders name files that are not here
    for cfg in configs:
        if not isinstance(cfg.data, SyntheticDataConfig):
            continue  # criteo / table: the prepared shards are not on disk here
        world, local = launch.world_size, launch.local_world_size
        if launch.module == "trainer.plan":
            if cfg.topology.world_size is None:
                continue  # the planner asks for it itself
            world = cfg.topology.world_size
            local = min(cfg.topology.local_world_size or world, world)
        try:
            validate(cfg, world_size=world, local_world_size=local)
        except ConfigError as err:
            raise AssertionError(
                f"{cmd.where}: {cmd.text}\n  validate (world_size={world}): {err}"
            ) from None


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command(cmd: Command, composer: Composer) -> None:
    check(cmd, composer)


def test_commands_found() -> None:
    """The collector sees the commands (guards against a parser that finds nothing)."""
    kinds = {(c.argv[0].rsplit("/", 1)[-1], *c.argv[1:3]) for c in COMMANDS}
    assert ("python", "-m", "trainer") in kinds
    assert ("python", "-m", "trainer.plan") in kinds
    assert ("python", "-m", "trainer.prepare") in kinds
    assert any(c.argv[0].endswith("torchrun") for c in COMMANDS)
    assert any(c.argv[0] == "sbatch" for c in COMMANDS)
    assert any(c.argv[0] == "make" for c in COMMANDS)


def test_renamed_option_fails(composer: Composer) -> None:
    """A command with a key or option that conf/ does not have is caught."""
    for text in (
        "python -m trainer trainer.num_stepz=5",
        "python -m trainer sharding=row_wsie",
        "torchrun --nproc_per_node=2 -m trainer -m +sweep=lr_batch optim.dense_lrr=0.1",
        "python -m trainer sharding=row_wise",  # validate: row_wise needs 2 processes
        "make trian",
    ):
        env, argv = _tokens(text) or ({}, [])
        with pytest.raises(AssertionError):
            check(Command("test", text, env, argv), composer)


def _conf_groups() -> dict[str, set[str]]:
    """Every config group of conf/ and its options (nested ones as ``compression/bf16``)."""
    groups: dict[str, set[str]] = {}
    for folder in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        if any(folder.glob("*.yaml")) and not any(
            folder.is_relative_to(CONF_DIR / g) for g in groups
        ):
            name = str(folder.relative_to(CONF_DIR))
            groups[name] = {
                str(p.relative_to(folder).with_suffix(""))
                for p in folder.rglob("*.yaml")
                if not p.stem.endswith("_schema")
            }
    return groups


def _readme_groups() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Config groups", 1)[1].split("\n#", 1)[0]
    groups: dict[str, set[str]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        name = re.findall(r"`([^`]+)`", cells[0])[0]
        groups[name] = set(re.findall(r"`([^`]+)`", cells[1]))
    return groups


def test_readme_config_groups_match_conf() -> None:
    assert _readme_groups() == _conf_groups()


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_resolve(path: Path) -> None:
    text = path.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not file.exists() or not file.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files {broken}"
    for outside in ("../" + "shared", "DESIGN.md"):  # the team's files, not the project's
        assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside}"
