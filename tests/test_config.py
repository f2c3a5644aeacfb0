"""The config surface: every group composes, typos fail at compose time, and
cross-field mistakes raise one ConfigError that names the key and the fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import CONF_DIR
from trainer.config.schema import (
    Config,
    ConfigError,
    TableConfig,
    to_config,
)
from trainer.config.validate import (
    open_source,
    validate,
    validate_for_device,
    validate_for_training,
)

GROUPS = ["model", "data", "sharding", "topology", "precision", "qat", "optim", "trainer", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(compose_cfg, override: str) -> None:
    cfg = to_config(compose_cfg([override]))
    assert isinstance(cfg, Config)
    group, option = override.split("=")
    if group == "data" and option != "synthetic":
        # A real-data source opens prepared shards (none here): one error naming them.
        with pytest.raises(ConfigError, match="prepare"):
            open_source(cfg.data)
        return
    if option in ("table_row_wise", "table_column_wise", "grid"):
        validate(cfg, world_size=4, local_world_size=2)
    else:
        validate(cfg, world_size=2 if option in ("row_wise", "column_wise") else 1)


def test_every_group_has_an_option() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no yaml"


@pytest.mark.parametrize(
    "override",
    ["trainer.num_stepz=5", "model.embeding_dim=8", "topology.hbm=3"],
)
def test_mistyped_key_fails_at_compose(compose_cfg, override: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg([override])


@pytest.mark.parametrize(
    "override",
    [
        "sharding.strategy=diagonal",
        "model.arch=transformer",
        "precision.name=bf61",
        "logger.name=tb",
        "+sharding.tables={t_cat_0:{strategy:diagonal}}",
    ],
)
def test_unknown_choice_fails_at_compose_listing_the_choices(compose_cfg, override: str) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg([override])
    assert "expected one of" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_compose(compose_cfg) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["trainer.batch_size=lots"])


def _cfg(compose_cfg, *overrides: str) -> Config:
    return to_config(compose_cfg(list(overrides)))


@pytest.mark.parametrize(
    ("overrides", "world_size", "names"),
    [
        (["sharding=row_wise"], 1, ["world_size > 1", "torchrun"]),
        (["model.embedding_dim=32"], 1, ["dense_arch_layer_sizes[-1]=16", "embedding_dim=32"]),
        (["trainer.batch_size=0"], 1, ["trainer.batch_size"]),
        (["model.over_arch_layer_sizes=[64,2]"], 1, ["over_arch_layer_sizes", "end in 1"]),
        (["model.over_arch_layer_sizes=[1]"], 1, ["over_arch_layer_sizes", "two"]),
        (["data.cardinalities=[10,0]"], 1, ["data.cardinalities", "[0]"]),
        (["sharding=table_row_wise"], 4, ["local world size 4", "topology.local_world_size=2"]),
        (
            ["+sharding.tables={t_nope:{strategy:row_wise}}"],
            2,
            ["sharding.tables.t_nope", "no such"],
        ),
        (["+sharding.tables={t_cat_0:{strategy:auto}}"], 2, ["t_cat_0.strategy", "grid"]),
        (["+sharding.tables={t_cat_0:{ranks:[5]}}"], 2, ["outside 0..1"]),
        (
            ["+sharding.tables={t_cat_0:{strategy:table_wise,ranks:[0,1]}}"],
            2,
            ["sharding.tables.t_cat_0.ranks=[0, 1]", "one rank"],
        ),
        (
            ["+sharding.tables={t_cat_0:{strategy:row_wise,ranks:[0]}}"],
            2,
            ["sharding.tables.t_cat_0.ranks", "not row_wise"],
        ),
        # precision=bf16 qat=int4 trains (bf16 dense, fp32 QAT tables); 16-bit QAT tables do not.
        (
            ["qat=int4", "precision=bf16", "precision.tables=fp16"],
            1,
            ["precision.tables=fp16", "precision.tables=auto"],
        ),
        (["sharding.column_shard_dim=6"], 1, ["sharding.column_shard_dim=6", "multiple of 4"]),
        (["sharding.column_shard_dim=12"], 1, ["t_cat_0", "dim 16", "divisor"]),
        (["qat.bits=3"], 1, ["qat.bits=3", "8 or 4"]),
        (["+qat.table_bits={t_nope:8}"], 1, ["qat.table_bits.t_nope"]),
    ],
)
def test_cross_field_errors_name_the_key(
    compose_cfg, overrides: list[str], world_size: int, names: list[str]
) -> None:
    cfg = _cfg(compose_cfg, *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world_size)
    for name in names:
        assert name in str(err.value)


def test_explicit_tables_are_checked(compose_cfg) -> None:
    cfg = _cfg(compose_cfg, "data.cardinalities=[10,20]", "data.hotness=[1]")
    validate(cfg)  # the implicit one-table-per-feature default is fine
    cfg.model.tables = [
        TableConfig(name="t", num_embeddings=10, feature_names=["cat_0"]),
        TableConfig(name="t", num_embeddings=20, feature_names=["cat_1"]),
    ]
    with pytest.raises(ConfigError, match="unique"):
        validate(cfg)
    cfg.model.tables[1].name = "u"
    cfg.model.tables[1].num_embeddings = 5
    with pytest.raises(ConfigError, match=r"num_embeddings=5 is smaller than the cardinality 20"):
        validate(cfg)
    cfg.model.tables = cfg.model.tables[:1]
    with pytest.raises(ConfigError, match="cat_1"):
        validate(cfg)


# The command line's one-line errors (exit 2, no traceback): tests/test_cli_errors.py.


def test_uvm_caching_on_cpu_is_a_clear_error(compose_cfg) -> None:
    cfg = _cfg(compose_cfg, "sharding.compute_kernel=fused_uvm_caching")
    validate(cfg)  # fine until the device is known
    with pytest.raises(ConfigError, match="needs CUDA.*compute_kernel=fused"):
        validate_for_device(cfg, "cpu")
    validate_for_device(cfg, "cuda")


def test_replica_layout_and_sync_every_checked_for_training(compose_cfg) -> None:
    hosts = _cfg(compose_cfg, "sharding.replicas=2", "sharding.replica_layout=hosts")
    validate_for_training(hosts, world_size=4, local_world_size=2)  # 2 hosts, one per group
    with pytest.raises(ConfigError, match="replica_layout=hosts needs whole hosts"):
        validate_for_training(hosts, world_size=4, local_world_size=4)  # 2 ranks of 1 host
    validate_for_training(  # K = 1: the layout does not matter
        _cfg(compose_cfg, "sharding.replica_layout=hosts"), world_size=4, local_world_size=4
    )
    every = _cfg(compose_cfg, "sharding.replicas=2", "sharding.replica_sync_every=10")
    validate_for_training(every, world_size=4, local_world_size=2)
    every.sharding.replica_sync_every = 0
    with pytest.raises(ConfigError, match="replica_sync_every=0 must be >= 1"):
        validate_for_training(every, world_size=4, local_world_size=2)
    typo = _cfg(compose_cfg, "sharding.replicas=2", "sharding.replica_layout=rows")
    with pytest.raises(ConfigError, match="replica_layout='rows'"):
        validate_for_training(typo, world_size=4, local_world_size=2)
