"""Checks of ``model.id_management`` (hash / managed_collision, trainer/models/collision.py).

Both put a torchrec managed-collision collection in front of the tables, which
torchrec shards row-wise only, and which the parts of shardrec that walk a plain
EmbeddingBagCollection (distillation, pruning, the wide tables of deepfm /
wide_deep) do not know yet: those combinations are refused here, each with the
key and the fix. The export serves both (the program remaps the raw ids:
trainer/export/remap.py).

Example::

    validate_id_management(cfg)   # raises ConfigError for sharding=table_wise with MC
"""

from __future__ import annotations

from trainer.config.checks import check
from trainer.config.schema import Config


def validate_id_management(cfg: Config) -> None:
    m = cfg.model
    kind = str(m.id_management)
    if kind == "direct":
        return
    key = f"model.id_management={kind}"
    check(m.mc_zch_size >= 0, f"model.mc_zch_size={m.mc_zch_size} must be >= 0 (0: source rows)")
    check(m.mc_input_hash_size >= 0, f"model.mc_input_hash_size={m.mc_input_hash_size} < 0")
    check(m.mc_eviction_interval > 0, "model.mc_eviction_interval must be > 0")
    check(m.mc_admit_min_count >= 0, "model.mc_admit_min_count must be >= 0")
    check(
        str(m.arch) in ("dlrm", "dlrm_dcnv2"),
        f"{key} is built for dlrm and dlrm_dcnv2 only (not {m.arch}); use model=dlrm",
    )
    strategies = {str(cfg.sharding.strategy)} | {
        str(p.strategy) for p in cfg.sharding.tables.values() if p.strategy
    }
    check(
        strategies == {"row_wise"},
        f"{key}: torchrec shards managed-collision tables row-wise only; pass "
        f"sharding=row_wise (also on one rank) and no other per-table strategy",
    )
    check(
        str(cfg.sharding.replicas) == "1",
        f"{key} with sharding.replicas={cfg.sharding.replicas} (2D sparse parallelism) is "
        f"not supported: each replica group would keep its own id maps; use sharding.replicas=1",
    )
    check(
        cfg.distill.name == "none",
        f"{key} with distill={cfg.distill.name} is not supported; use distill=none",
    )
    p = cfg.prune
    check(
        not (p.row_min_norm or p.min_access or p.dense_sparsity),
        f"{key} with prune.* is not supported; leave prune.row_min_norm, prune.min_access "
        f"and prune.dense_sparsity at 0",
    )
