"""The contenders of ``make bench``, each a ``step()`` closure over its own model.

The shapes and shardrec's contenders are here; the baselines (``pytorch``,
``torchrec``, ``dense``) in ``benchmarks.baselines``.

- ``shardrec``: the real trainer path. Hydra composes ``conf/`` with the shape's
  overrides, ``trainer.builder.model.build`` plans and shards, and ``Trainer.train_steps``
  runs the configured torchrec pipeline over the synthetic source, which draws
  every batch (labels from the planted model) inside the step, as in training.
- ``shardrec_prefetch``: the same trainer, its source wrapped in
  ``trainer.data.prefetch.Prefetcher`` (batches built on a background thread).
- ``shardrec_pregen``: the same trainer, pipeline and model over batches drawn
  up front (as the baselines get them): shardrec's step without the input drawing.
- ``pytorch``: a straightforward PyTorch DLRM: one ``nn.EmbeddingBag`` per table
  with sparse gradients, the whole model under DDP, ``torch.optim.Adagrad``.
- ``torchrec``: torchrec's examples/golden_training/train_dlrm.py: tables on
  ``meta``, fused row-wise Adagrad via ``apply_optimizer_in_backward``, DMP with
  the default planner, dense Adagrad, ``TrainPipelineSparseDist`` over batches
  generated up front.
- ``dense``: the floor: bottom MLP, interaction (shardrec's) and top MLP forward,
  backward and Adagrad on the same batch, pooled embeddings given (no tables, no comms).

The baselines read the same samples as shardrec (drawn once, up front, from the
same synthetic source), so only the training loop differs.

Example::

    shape = SHAPES["small"]
    shardrec = make_shardrec(shape, env=env, device="cpu")
    batches = draw_batches(shardrec.source, shape, rank=env.rank, world_size=env.world_size, num=8)
    torchrec = make_torchrec(shape, env=env, batches=batches)   # benchmarks.baselines
    torchrec.step(10)        # ten training steps
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: model, tables and batch (the same for every contender)."""

    name: str
    embedding_dim: int
    dense_arch: list[int]
    over_arch: list[int]
    num_tables: int = 26
    rows: int = 100_000
    hotness: list[int] = field(default_factory=lambda: [1])
    batch_size: int = 2048  # per rank
    num_dense: int = 13
    arch: str = "dlrm"
    # Extra Hydra overrides for the shardrec contender (e.g. the DCNv2 shape).
    overrides: tuple[str, ...] = ()
    cardinalities: tuple[int, ...] = ()

    def table_rows(self) -> list[int]:
        return list(self.cardinalities) or [self.rows] * self.num_tables

    def hotness_per_table(self) -> list[int]:
        n = len(self.table_rows())
        return list(self.hotness) * n if len(self.hotness) == 1 else list(self.hotness)


def _mlperf_dcnv2() -> dict[str, Any]:
    import yaml

    with open(REPO / "conf/experiment/mlperf_dcnv2.yaml") as f:
        return yaml.safe_load(f)


def dcnv2_shape(*, max_rows: int, batch_size: int) -> Shape:
    """MLPerf DLRM-DCNv2 (dim 128, 214 ids per sample), tables capped at ``max_rows``."""
    exp = _mlperf_dcnv2()
    cards = tuple(min(c, max_rows) for c in exp["data"]["cardinalities"])
    m = exp["model"]
    return Shape(
        name=f"dcnv2 (rows <= {max_rows:,})",
        embedding_dim=m["embedding_dim"],
        dense_arch=m["dense_arch_layer_sizes"],
        over_arch=m["over_arch_layer_sizes"],
        hotness=list(exp["data"]["hotness"]),
        batch_size=batch_size,
        arch="dlrm_dcnv2",
        cardinalities=cards,
        overrides=("model=dlrm_dcnv2", "model.dcn_num_layers=3", "model.dcn_low_rank_dim=512"),
    )


SHAPES: dict[str, Shape] = {
    # Embedding and overhead bound.
    "small": Shape("small", 16, [64, 16], [64, 32, 1]),
    # MLPerf DLRM's MLPs: dense compute bound.
    "mlperf_mlp": Shape("mlperf_mlp", 64, [512, 256, 64], [1024, 1024, 512, 256, 1]),
    # Multi-hot: 20 ids per bag on 8 of the 26 features.
    "multihot": Shape("multihot", 16, [64, 16], [64, 32, 1], hotness=[20] * 8 + [1] * 18),
}


# Extra Hydra overrides for the shardrec contenders (bench.py --shardrec-overrides).
EXTRA_OVERRIDES: list[str] = []


def shardrec_overrides(shape: Shape, *, device: str) -> list[str]:
    rows = shape.table_rows()
    return [
        f"model.embedding_dim={shape.embedding_dim}",
        f"model.dense_arch_layer_sizes={shape.dense_arch}",
        f"model.over_arch_layer_sizes={shape.over_arch}",
        f"data.cardinalities={rows}",
        f"data.hotness={shape.hotness_per_table()}",
        f"data.num_dense={shape.num_dense}",
        # The calibration caps are for CPU-sized tables; plant pairs among these.
        f"data.interaction_max_cardinality={max(rows)}",
        f"data.interaction_small_cardinality={max(rows)}",
        f"trainer.batch_size={shape.batch_size}",
        "trainer.num_threads=1" if device == "cpu" else "trainer.num_threads=null",
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "optim.dense_optimizer=adagrad",
        "optim.dense_lr=0.01",
        f"sharding.device={device}",
        *shape.overrides,
        *EXTRA_OVERRIDES,
    ]


def compose_config(overrides: list[str]) -> Any:
    """The trainer's typed config, composed from conf/ as ``python -m trainer`` does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config.run_dir import register_resolvers
    from trainer.config.schema import register_configs, to_config

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dict_cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    return to_config(dict_cfg)


class _PrefetchedSource:
    """A DataSource whose train batches are built ahead on a background thread."""

    def __init__(self, source: Any, *, depth: int, num_threads: int | None) -> None:
        self._source = source
        self._depth = depth
        self._num_threads = num_threads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def train_batches(self, **kwargs: Any) -> Iterator[Batch]:
        from trainer.data.prefetch import Prefetcher

        return Prefetcher(
            self._source.train_batches(**kwargs), depth=self._depth, num_threads=self._num_threads
        )


class _PregenSource:
    """A DataSource whose train batches are ``batches``, drawn once, in a cycle."""

    def __init__(self, source: Any, batches: list) -> None:
        self._source = source
        self._batches = batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def train_batches(self, *, num_steps: int, **_: Any) -> Iterator[Batch]:
        return itertools.islice(itertools.cycle(self._batches), num_steps)


@dataclass
class Contender:
    name: str
    step: Callable[[int], None]  # runs n training steps
    trainer: Any = None  # shardrec's Trainer (for the breakdown)
    source: Any = None
    model: Any = None  # the DistributedModelParallel, where there is one


def make_source(shape: Shape, *, env: Any, device: str) -> Any:
    """The synthetic source shardrec reads for ``shape`` (on ``env.device``)."""
    from trainer.config.validate import open_source

    cfg = compose_config(shardrec_overrides(shape, device=device))
    source = open_source(cfg.data)
    return source.to(env.device) if env.device.type != "cpu" else source


def make_shardrec(
    shape: Shape,
    *,
    env: Any,
    device: str,
    prefetch: bool = False,
    staged: bool = False,
    fbgemm_backward: bool = False,
    source: Any = None,
    batches: list | None = None,
) -> Contender:
    """The trainer; ``prefetch``: its batches drawn on a thread; ``batches``: drawn up
    front; ``staged``: its synthetic slots drawn in stages (torch ops), not by the
    compiled loop (``trainer.data.slot_draw``); ``fbgemm_backward``: its CPU tables
    updated by FBGEMM's backward, not the compiled one (``sharding.tbe_cpu``); the
    last two for an A/B in the same processes."""
    from tqdm import tqdm

    from sharding import tbe_cpu
    from trainer.data import slot_draw
    from trainer.loop.trainer import Trainer
    from trainer.report.logger import make_logger
    from trainer.session import build

    cfg = compose_config(shardrec_overrides(shape, device=device))
    source = source or make_source(shape, env=env, device=device)
    switch = os.environ.get(tbe_cpu.SWITCH)
    if fbgemm_backward:  # read when the model is sharded
        os.environ[tbe_cpu.SWITCH] = "0"
    try:
        built = build(cfg, env, source=source)
    finally:
        if switch is None:
            os.environ.pop(tbe_cpu.SWITCH, None)
        else:
            os.environ[tbe_cpu.SWITCH] = switch
    run_dir = Path(tempfile.mkdtemp(prefix="shardrec-bench-"))
    logger = make_logger(cfg.logger, run_dir=run_dir, rank=env.rank, config={})
    used = source
    if prefetch:
        used = _PrefetchedSource(source, depth=2, num_threads=1 if device == "cpu" else None)
    elif batches is not None:
        used = _PregenSource(source, batches)
    trainer = Trainer(
        model=built.model,
        optimizer=built.optimizer,
        env=env,
        source=used,
        settings=cfg.trainer,
        logger=logger,
        run_dir=run_dir,
        model_fwd=built.converters.wrap_forward(built.model),
    )
    bar = tqdm(disable=True)
    name = "shardrec_prefetch" if prefetch else "shardrec_pregen" if batches else "shardrec"

    def step(n: int) -> None:
        if not staged:
            trainer.train_steps(n, bar)
            return
        # The draw happens inside the steps (the pipeline pulls its batches there).
        # The switch is process-wide: a shardrec_prefetch producer drawing ahead
        # meanwhile draws in stages too, so compare the two without it.
        before, slot_draw.ENABLED = slot_draw.ENABLED, False
        try:
            trainer.train_steps(n, bar)
        finally:
            slot_draw.ENABLED = before

    if fbgemm_backward:
        name = "shardrec_fbgemm"
    return Contender(
        "shardrec_staged" if staged else name,
        step,
        trainer=trainer,
        source=source,
        model=built.model,
    )


def draw_batches(source: Any, shape: Shape, *, rank: int, world_size: int, num: int) -> list:
    """``num`` of this rank's batches, drawn up front (as the golden example does)."""
    it = source.train_batches(
        batch_size=shape.batch_size, rank=rank, world_size=world_size, first_step=0, num_steps=num
    )
    return list(it)


def barrier(env: Any) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized() and env.world_size > 1:
        dist.barrier()
