"""The serving paths ``benchmarks/serve.py`` times, built from one trained run.

Each path is a callable ``(rows) -> float32[B] probabilities`` over the same
:class:`Rows` (one eval batch: dense, KJT ids and lengths):

- ``eager``: today's pickled eager module, built in-process
  (``compression.serving.quantize_for_serving`` through the run's converters;
  torchrec's quantized EBC over FBGEMM's TBE), called on a KeyedJaggedTensor;
- ``program``: the bundle's ``torch.export`` program (``torch.export.load(...).module()``);
- ``compiled``: ``torch.compile(program, dynamic=True)``;
- ``aoti``: the bundle's ``ExportedProgram`` through
  ``torch._inductor.aoti_compile_and_package`` (C++ .so in a .pt2 package),
  loaded with ``torch._inductor.aoti_load_package``;
- ``torchrec``: torchrec's reference path on the same weights
  (``torchrec/inference/dlrm_predict.py``): ``DLRMPredictModule`` (torchrec's
  ``DLRM``) loaded with the run's fp32 state dict, ``quantize_inference_model``
  with the run's per-table dtypes, FX-traced (torchrec's ``Tracer``, the TBE a
  leaf) and ``torch.jit.script``-ed; called on its dict of tensors.

Example::

    rows = load_run(Path("outputs/bench-serve/int8"))
    paths, errors = build_paths(rows.run, rows.trained, skip={"aoti"}, work=Path("/tmp/w"))
    scores = paths["program"](rows.first(64))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

PATHS = ("eager", "program", "compiled", "aoti", "torchrec")
Runner = Callable[["Rows"], Tensor]


@dataclass
class Rows:
    """``B`` eval rows in every input form the paths take."""

    dense: Tensor
    ids: Tensor
    lengths: Tensor
    keys: list[str]

    @property
    def batch(self) -> int:
        return self.dense.shape[0]

    def first(self, batch: int) -> Rows:
        """The first ``batch`` rows (KJT lengths are feature-major: sliced per feature)."""
        num_features = len(self.keys)
        full = self.batch
        lengths = self.lengths.view(num_features, full)
        starts = torch.cat([lengths.new_zeros(1), lengths.flatten().cumsum(0)])[::full][:-1]
        ids = [
            self.ids[int(s) : int(s) + int(n)]
            for s, n in zip(starts, lengths[:, :batch].sum(1), strict=True)
        ]
        return Rows(
            dense=self.dense[:batch].contiguous(),
            ids=torch.cat(ids),
            lengths=lengths[:, :batch].contiguous().flatten(),
            keys=self.keys,
        )

    def kjt(self) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=self.keys, values=self.ids, lengths=self.lengths)


@dataclass
class Trained:
    """One run's trained model (fp32, eval) and what serving it needs."""

    run: Path
    dlrm: nn.Module
    served: nn.Module  # the eager quantized module (a)
    model_cfg: Any
    num_dense: int
    table_dtypes: dict[str, torch.dtype]
    rows: Rows


def load_run(run: Path, *, max_batch: int) -> Trained:
    """The newest checkpoint of ``run`` rebuilt as the export did, and ``max_batch`` eval rows."""
    from compression.fake_quant import SERVING_DTYPES
    from trainer.builder.compression import build_converters
    from trainer.builder.model import build_trained
    from trainer.checkpoint.load import complete_checkpoints, load_unsharded_model
    from trainer.config.saved import read_config
    from trainer.config.tables import run_tables
    from trainer.config.validate import open_source

    found = complete_checkpoints(run / "checkpoints")
    if not found or not (run / "bundle" / "model.pt2").is_file():
        raise FileNotFoundError(
            f"{run}: needs checkpoints/step_N and bundle/model.pt2 (a run with "
            "trainer.export=true trainer.checkpoint_every_steps=N)"
        )
    cfg = read_config(found[-1])
    source = open_source(cfg.data)
    tables = run_tables(cfg, features=source.features)
    converters = build_converters(cfg, tables=tables, device_type="cpu")
    trained = build_trained(
        cfg.model, tables=tables, num_dense=source.num_dense, converters=converters
    )
    load_unsharded_model(found[-1], trained)
    dlrm = trained.model.eval()
    served = converters.to_serving(dlrm).eval()
    bits = converters.export_summary().get("bits", {})
    names = [t.name for t in dlrm.sparse_arch.embedding_bag_collection.embedding_bag_configs()]
    dtypes = {n: SERVING_DTYPES[bits[n]] if bits.get(n) else torch.float for n in names}
    batch = next(iter(source.eval_batches(batch_size=max_batch, rank=0, world_size=1)))
    kjt = batch.sparse_features
    if batch.dense_features.shape[0] < max_batch:
        raise ValueError(f"{run}: the eval set has fewer than {max_batch} rows")
    rows = Rows(
        dense=batch.dense_features.float().contiguous(),
        ids=kjt.values().long().contiguous(),
        lengths=kjt.lengths().long().contiguous(),
        keys=list(kjt.keys()),
    )
    return Trained(run, dlrm, served, cfg.model, source.num_dense, dtypes, rows)


def build_paths(
    trained: Trained, *, skip: set[str], work: Path
) -> tuple[dict[str, Runner], dict[str, dict[str, Any]]]:
    """``{path: runner}`` and ``{path: {"build_s", "error"?, "skipped"?}}`` for every path."""
    program_file = trained.run / "bundle" / "model.pt2"
    program = torch.export.load(str(program_file)).module()
    builders: dict[str, Callable[[], Runner]] = {
        "eager": lambda: _eager(trained.served),
        "program": lambda: program,
        "compiled": lambda: torch.compile(program, dynamic=True),
        "aoti": lambda: _aoti(program_file, work / "model_aoti.pt2"),
        "torchrec": lambda: _torchrec(trained),
    }
    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in PATHS:
        if name in skip:
            info[name] = {"skipped": True}
            continue
        start = time.perf_counter()
        try:
            built = builders[name]()
            runner = _on_tensors(built) if name in ("program", "compiled", "aoti") else built
            with torch.no_grad():
                runner(trained.rows.first(8))  # compile / first call, outside the build time
            runners[name] = runner
            info[name] = {"build_s": round(time.perf_counter() - start, 1)}
        except Exception as err:  # recorded in the table: e.g. AOTInductor and the FBGEMM op
            info[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    return runners, info


def _on_tensors(module: Callable[..., Tensor]) -> Runner:
    return lambda rows: module(rows.dense, rows.ids, rows.lengths)


def _eager(served: nn.Module) -> Runner:
    return lambda rows: torch.sigmoid(served(rows.dense, rows.kjt()).flatten())


def _aoti(program_file: Path, package: Path) -> Callable[..., Tensor]:
    package.parent.mkdir(parents=True, exist_ok=True)
    exported = torch.export.load(str(program_file))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
    return torch._inductor.aoti_load_package(path)


def _torchrec(trained: Trained) -> Runner:
    """dlrm_predict.py's steps on torchrec's own DLRM holding the run's weights."""
    from torchrec.distributed.global_settings import set_propogate_device
    from torchrec.fx.tracer import Tracer
    from torchrec.inference.dlrm_predict import DLRMPredictModule
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    set_propogate_device(True)
    ebc = trained.dlrm.sparse_arch.embedding_bag_collection
    configs = [copy.deepcopy(c) for c in ebc.embedding_bag_configs()]
    dense_sizes = [
        m.out_features for m in trained.dlrm.dense_arch.modules() if isinstance(m, nn.Linear)
    ]
    over_sizes = [
        m.out_features for m in trained.dlrm.over_arch.modules() if isinstance(m, nn.Linear)
    ]
    module = DLRMPredictModule(
        embedding_bag_collection=EmbeddingBagCollection(tables=configs),
        dense_in_features=trained.num_dense,
        dense_arch_layer_sizes=dense_sizes,
        over_arch_layer_sizes=over_sizes,
        id_list_features_keys=trained.rows.keys,
        dense_device=torch.device("cpu"),  # else its forward asks for a CUDA device
    )
    module.predict_module.load_state_dict(trained.dlrm.state_dict())
    module.eval()
    quantized = quantize_inference_model(module, per_table_weight_dtype=trained.table_dtypes)
    tracer = Tracer(leaf_modules=["IntNBitTableBatchedEmbeddingBagsCodegen"])
    graph = tracer.trace(quantized)
    scripted = torch.jit.script(torch.fx.GraphModule(quantized, graph))

    def run(rows: Rows) -> Tensor:
        batch = {
            "float_features": rows.dense,
            "id_list_features.lengths": rows.lengths,
            "id_list_features.values": rows.ids,
        }
        return scripted(batch)["default"]

    return run
