"""Online distillation: the pair's gradients, shared tables, the loss, the config surface.

Unsharded and in one process (the 2-rank sharded run is tests/test_distill_sharded.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from compression.distill import DistillConverter, distill_loss
from tests.conftest import REPO
from tests.reference import synthetic_tables, unsharded_model
from tests.test_sharding_equivalence import tiny_config
from trainer.builder.compression import build_converters
from trainer.config.schema import (
    Config,
    ConfigError,
    DistillConfig,
    TableConfig,
    to_config,
)
from trainer.config.validate import validate
from trainer.data import SyntheticCriteo
from trainer.models.distill import DistillTrain, _logits, make_pair


def distill_config(**distill: object) -> Config:
    cfg = tiny_config("table_wise")
    cfg.distill = DistillConfig(
        name="online", embedding_dim=4, dense_arch_layer_sizes=[8, 4], **distill
    )
    if cfg.distill.share_tables:
        cfg.distill.dense_arch_layer_sizes = [8, cfg.model.embedding_dim]
    return cfg


def pair_of(cfg: Config) -> DistillTrain:
    torch.manual_seed(0)
    teacher = unsharded_model(cfg, device=torch.device("cpu"))
    return make_pair(teacher, tables=_tables(cfg), distill=cfg.distill, model=cfg.model)


def a_batch(cfg: Config, batch_size: int = 64):  # noqa: ANN201
    source = SyntheticCriteo(cfg.data)
    return next(
        iter(
            source.train_batches(
                batch_size=batch_size, rank=0, world_size=1, first_step=0, num_steps=1
            )
        )
    )


def _tables(cfg: Config) -> list[TableConfig]:
    return synthetic_tables(cfg).model


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in module.named_parameters()
    }


def test_distill_loss_is_the_formula() -> None:
    s, t = torch.randn(32), torch.randn(32)
    y = (torch.rand(32) < 0.3).float()
    got = distill_loss(s, t, y, alpha=0.3, temperature=2.0)
    soft = F.binary_cross_entropy_with_logits(s / 2, torch.sigmoid(t / 2))
    want = 0.3 * F.binary_cross_entropy_with_logits(s, y) + 0.7 * 4 * soft
    torch.testing.assert_close(got, want)
    hard = distill_loss(s, t, y, alpha=0.3, temperature=2.0, soft=False)
    torch.testing.assert_close(hard, F.binary_cross_entropy_with_logits(s, y))


@pytest.mark.parametrize("share_tables", [False, True])
def test_no_distillation_gradient_reaches_the_teacher(share_tables: bool) -> None:
    """The teacher's gradients (arches and tables) are those of its own BCE alone."""
    cfg = distill_config(alpha=0.2, temperature=2.0, share_tables=share_tables)
    pair, batch = pair_of(cfg), a_batch(cfg)
    loss, (_, logits, labels) = pair(batch)
    loss.backward()
    with_soft = grads(pair)

    pair.zero_grad()
    teacher_logits = pair.teacher(batch.dense_features, batch.sparse_features).squeeze(-1)
    F.binary_cross_entropy_with_logits(teacher_logits, batch.labels.float()).backward()
    teacher_only = grads(pair)

    names = [n for n in with_soft if n.startswith("teacher.")]
    assert any("embedding_bags" in n for n in names) and any("over_arch" in n for n in names)
    for name in names:
        if share_tables and "embedding_bags" in name:
            continue  # shared tables also get the student's gradient (next test)
        torch.testing.assert_close(with_soft[name], teacher_only[name], rtol=0, atol=0)
    torch.testing.assert_close(logits["teacher"], teacher_logits.detach())
    # The check can fail: the student's gradient does depend on the teacher's logits.
    pair.zero_grad()
    pair.soft = False
    pair(batch)[0].backward()
    hard = grads(pair)
    student = [n for n in with_soft if n.startswith("student.")]
    assert student and any(not torch.equal(with_soft[n], hard[n]) for n in student)


def test_shared_tables_are_looked_up_once_and_get_both_gradients() -> None:
    cfg = distill_config(alpha=0.5, share_tables=True)
    pair, batch = pair_of(cfg), a_batch(cfg)
    assert not any(n.startswith("student.sparse_arch") for n in pair.state_dict())
    ebc = pair.teacher.sparse_arch.embedding_bag_collection
    calls = []
    ebc.register_forward_hook(lambda *_: calls.append(1))
    loss, _ = pair(batch)
    assert len(calls) == 1  # one lookup, so one (fused) backward and update per step
    loss.backward()
    both = {n: p.grad.clone() for n, p in ebc.named_parameters()}

    pair.zero_grad()
    pair.teacher.requires_grad_(False)  # the student's part of the table gradient alone
    for p in ebc.parameters():
        p.requires_grad_(True)
    pooled = pair.teacher.sparse_arch(batch.sparse_features)
    s = _logits(pair.student, batch.dense_features, pooled)
    t = _logits(pair.teacher, batch.dense_features, pooled)
    (distill_loss(s, t, batch.labels.float(), alpha=0.5, temperature=1.0)).backward()
    student_part = {n: p.grad.clone() for n, p in ebc.named_parameters()}
    assert any(g.abs().sum() > 0 for g in student_part.values())
    for n in both:
        assert not torch.equal(both[n], student_part[n])  # the teacher's part is in there too


def test_student_tables_are_named_and_quantized_by_name() -> None:
    cfg = distill_config(student_qat_bits=4)
    cfg.qat.table_bits = {"t_cat_0": 8}
    run = synthetic_tables(cfg)
    tables = run.trained
    assert [t.name for t in tables][-4:] == ["s_t_cat_0", "s_t_cat_1", "s_t_cat_2", "s_t_cat_3"]
    assert {t.embedding_dim for t in tables[4:]} == {4}
    bits = run.qat_bits
    assert bits == {"t_cat_0": 8, **{f"s_t_cat_{i}": 4 for i in range(4)}}
    # The export serves the student alone, at its QAT bits.
    assert run.export_bits == {f"s_t_cat_{i}": 4 for i in range(4)}
    validate(cfg)
    # Per-table settings address student tables by name.
    cfg.qat.table_bits = {"s_t_cat_1": 2}
    validate(cfg)
    cfg.qat.table_bits = {"s_t_cat_9": 2}
    with pytest.raises(ConfigError, match="s_t_cat_9"):
        validate(cfg)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"alpha": 1.5}, "distill.alpha"),
        ({"dense_arch_layer_sizes": [8, 8]}, "distill.dense_arch_layer_sizes"),
        ({"over_arch_layer_sizes": [8, 2]}, "distill.over_arch_layer_sizes"),
        ({"share_tables": True, "student_qat_bits": 4}, "student_qat_bits"),
        ({"freeze_teacher": True}, "distill.teacher_checkpoint"),
        ({"teacher_checkpoint": "/nonexistent/step_3"}, "distill.teacher_checkpoint"),
    ],
)
def test_bad_distill_settings_name_the_key(change: dict, match: str) -> None:
    cfg = distill_config()
    cfg.distill = dataclasses.replace(cfg.distill, **change)
    if change.get("share_tables"):
        cfg.distill.dense_arch_layer_sizes = [8, cfg.model.embedding_dim]
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_warmup_switches_the_soft_term_on_and_is_checkpoint_state() -> None:
    cfg = distill_config(warmup_steps=2)
    converters = build_converters(cfg, tables=synthetic_tables(cfg), device_type="cpu")
    teacher = unsharded_model(cfg, device=torch.device("cpu"))
    model = converters.wrap_model(teacher)
    assert isinstance(model, DistillTrain)
    converters.convert_sharded(model, device=torch.device("cpu"), process_group=None)
    seen = []
    forward = converters.wrap_forward(model)
    assert forward is not None

    def spy(batch):  # noqa: ANN001, ANN202
        seen.append(model.soft)
        return model(batch)

    (distill,) = [c for c in converters if isinstance(c, DistillConverter)]
    wrapped = distill.wrap_forward(spy)
    batch = a_batch(cfg, batch_size=8)
    for _ in range(4):
        wrapped(batch)
    model.eval()
    wrapped(batch)  # eval forwards do not count
    assert seen == [False, False, True, True, True]
    assert int(converters.state_dict()["distill"]["step"]) == 4


def test_distill_configs_compose(compose_cfg) -> None:  # noqa: ANN001
    cfg = to_config(compose_cfg(["distill=online", "qat=int2"]))
    assert cfg.distill.name == "online" and cfg.qat.bits == 2
    assert to_config(compose_cfg([])).distill.name == "none"


def test_the_study_sweep_composes_every_job(compose_cfg) -> None:  # noqa: ANN001
    params = OmegaConf.load(REPO / "conf" / "sweep" / "distill_study.yaml").hydra.sweeper.params
    experiments = str(params["experiment"]).split(",")
    assert len(experiments) == 4 and str(params["trainer.seed"]).split(",") == ["0", "1", "2"]
    shapes = {}
    for experiment in experiments:
        cfg = to_config(compose_cfg(["+sweep=distill_study", f"experiment={experiment}"]))
        validate(cfg)
        shapes[experiment] = cfg
    # The student alone has the distilled student's shape.
    alone, distilled = shapes["distill/student"], shapes["distill/distilled"].distill
    assert alone.model.embedding_dim == distilled.embedding_dim
    assert alone.model.dense_arch_layer_sizes == distilled.dense_arch_layer_sizes
    assert alone.model.over_arch_layer_sizes == distilled.over_arch_layer_sizes
    assert shapes["distill/distilled_int4"].distill.student_qat_bits == 4


def test_study_script_reports_mean_sd_and_targets(tmp_path: Path) -> None:
    from benchmarks.studies.distill import main

    aucs = {
        "student": [0.70, 0.71, 0.72],
        "distilled": [0.75, 0.75, 0.75],
        "distilled_int4": [0.749, 0.75, 0.751],
        "teacher": [0.80, 0.80, 0.80],
    }
    for name, values in aucs.items():
        for seed, auc in enumerate(values):
            job = tmp_path / f"{name}{seed}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(
                f"- experiment=distill/{name}\n- trainer.seed={seed}\n"
            )
            head = "student." if "distilled" in name else ""
            summary = {
                f"{head}auc": auc,
                f"{head}logloss": 0.4,
                "global_batch_size": 1024,
                "samples_per_sec": 1024.0 if name != "teacher" else 2048.0,
            }
            (job / "summary.json").write_text(json.dumps(summary))
    assert main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "distill_study.json").read_text())
    verdict = result["verdicts"]
    assert verdict["beats_student_alone_beyond_spread"] is True
    assert verdict["gap_closed"] == pytest.approx(0.04 / 0.09)
    assert verdict["int4_vs_fp32_auc"] == pytest.approx(0.0)
    assert verdict["step_time_cost"] == pytest.approx(1.0)
    assert (tmp_path / "distill_study.png").stat().st_size > 1000
