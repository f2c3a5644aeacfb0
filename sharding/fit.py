"""Why a model does not fit a topology: bytes needed against bytes available.

When no placement fits, torchrec's planner raises a ``PlannerError`` with a long
report. This answers the user's question from the tables themselves: weights
plus optimizer state, against what each device offers once the storage
reservation is taken off, naming the tables that do not fit and the smallest
world that would hold them (before the planner's per-shard buffers).

Example::

    tables = [table_bytes("t_big", num_embeddings=40_000_000, embedding_dim=128)]
    print(explain_no_fit(tables, strategy="auto", world_size=1, compute_device="cuda",
                         hbm_gb=16, ddr_gb=64, storage_reservation_percentage=0.15))
    # the 1 table(s) need 19.22 GiB (20,640,000,000 bytes) of HBM for weights and optimizer
    # state in all, but 1 cuda device offers 13.60 GiB ... Largest tables: ... Fix: ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sharding.report import format_bytes

_GIB = 1024**3


@dataclass(frozen=True)
class TableBytes:
    name: str
    weight_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes


def table_bytes(
    name: str,
    *,
    num_embeddings: int,
    embedding_dim: int,
    element_bytes: int = 4,
    optimizer_values_per_row: int = 1,
) -> TableBytes:
    """Weights and optimizer state of one table.

    The defaults are this project's tables: fp32 weights, and FBGEMM's fused
    row-wise Adagrad (``sharding.dmp.fuse_embedding_optimizer``), which keeps one
    fp32 accumulator per row.
    """
    return TableBytes(
        name=name,
        weight_bytes=num_embeddings * embedding_dim * element_bytes,
        optimizer_bytes=num_embeddings * optimizer_values_per_row * 4,
    )


def _size(num_bytes: float) -> str:
    return f"{format_bytes(num_bytes)} ({int(num_bytes):,} bytes)"


def explain_no_fit(
    tables: list[TableBytes],
    *,
    strategy: str,
    world_size: int,
    compute_device: str,
    hbm_gb: float,
    ddr_gb: float,
    storage_reservation_percentage: float,
    planner_message: str = "",
) -> str:
    """One message: which tables, how many bytes they need, how many are available."""
    on_device = compute_device != "cpu"
    tier, key = ("HBM", "topology.hbm_gb") if on_device else ("host memory", "topology.ddr_gb")
    cap_gb = hbm_gb if on_device else ddr_gb
    # torchrec's storage reservation shrinks HBM only.
    per_rank = int(cap_gb * _GIB * ((1 - storage_reservation_percentage) if on_device else 1))
    each = f"{format_bytes(per_rank)} each: {key}={cap_gb:g}" + (
        f" less storage_reservation_percentage={storage_reservation_percentage:g}"
        if on_device
        else ""
    )
    largest = sorted(tables, key=lambda t: t.total_bytes, reverse=True)
    total = sum(t.total_bytes for t in tables)
    top = ", ".join(f"{t.name} {format_bytes(t.total_bytes)}" for t in largest[:5])

    if strategy == "table_wise":
        too_big = [t for t in largest if t.total_bytes > per_rank]
        if too_big:
            names = ", ".join(f"{t.name} {_size(t.total_bytes)}" for t in too_big[:5])
            return (
                f"sharding=table_wise keeps each table whole on one rank, but "
                f"{len(too_big)} table(s) need more {tier} than one {compute_device} device "
                f"offers ({each}): {names}. Fix: use sharding=auto or row_wise, or raise {key}."
            )
    if strategy == "data_parallel":
        needed, available = total, per_rank
        scope = "on every rank (data_parallel replicates each table)"
        offer = f"one {compute_device} device offers"
        fix = f"use sharding=auto or row_wise, or raise {key}"
    else:
        needed, available = total, per_rank * world_size
        scope = "in all"
        plural = "s offer" if world_size > 1 else " offers"
        offer = f"{world_size} {compute_device} device{plural}"
        fix = (
            f"raise topology.world_size (the bytes alone need at least "
            f"{math.ceil(total / per_rank)} such devices) or {key}"
        )
    head = (
        f"the {len(tables)} table(s) need {_size(needed)} of {tier} for weights and "
        f"optimizer state {scope}, but {offer} {_size(available)} ({each})"
    )
    if needed > available:
        return f"{head}. Largest tables: {top}. Fix: {fix}."
    first_line = planner_message.strip().splitlines()[0] if planner_message.strip() else ""
    return (
        f"{head}, yet the planner found no placement: its estimates add per-shard "
        f"input/output buffers (they grow with trainer.batch_size) and tables split only "
        f"in whole rows or column blocks. Largest tables: {top}. Fix: raise "
        f"topology.world_size or {key}, or lower trainer.batch_size. torchrec: {first_line}"
    )
