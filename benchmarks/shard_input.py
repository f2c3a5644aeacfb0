"""Input cost of training from prepared shards against the synthetic source.

Writes the planted clicks as Criteo TSV (``benchmarks.planted_to_tsv``),
prepares them into shards, then on the default model and batch:

1. times building ``--batches`` training batches alone (shuffled, per-rank
   batch 1024) from the shards and from the synthetic source;
2. trains ``--steps`` steps from each (``python -m trainer``), reading
   ``samples_per_sec`` from the summaries; from the shards twice, with the
   batches built inline (``trainer.prefetch=off``) and as ``auto`` does it on
   ``--device`` (a GPU: ahead on a thread, pinned; the CPU: inline);
3. prints the input time per batch as a share of the step time of that run.

Example::

    python -m benchmarks.shard_input outputs/bench-shards --rows 262144 --steps 300
    python -m benchmarks.shard_input outputs/bench-shards --device cuda   # a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BATCH = 1024


def input_ms(source, batches: int) -> float:
    """Milliseconds per training batch, built and discarded, after one warm-up batch."""
    it = source.train_batches(
        batch_size=BATCH, rank=0, world_size=1, first_step=0, num_steps=batches + 1
    )
    next(it)
    start = time.perf_counter()
    for _ in it:
        pass
    return (time.perf_counter() - start) / batches * 1e3


def train_samples_per_s(run_dir: Path, steps: int, *overrides: str) -> float:
    settings = [f"trainer.num_steps={steps}", f"trainer.eval_every_steps={steps}"]
    cmd = [sys.executable, "-m", "trainer", *settings, f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "summary.json").read_text())["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=262144, help="planted train rows")
    parser.add_argument("--batches", type=int, default=200, help="batches timed alone")
    parser.add_argument("--steps", type=int, default=300, help="training steps per source")
    parser.add_argument("--device", default="cpu", help="sharding.device of the training runs")
    args = parser.parse_args()
    on = f"sharding.device={args.device}"

    import torch

    from benchmarks.planted_to_tsv import prepare_overrides, write_planted_tsv
    from trainer.data import SyntheticCriteo, SyntheticDataConfig
    from trainer.data.shards import ShardSource

    torch.set_num_threads(1)  # the input work of one rank, as a step sees it
    shards = args.out / "shards"
    if not (shards / "metadata.json").is_file():
        info = write_planted_tsv(args.out, num_train=args.rows, num_eval=8192)
        overrides = prepare_overrides(args.out, info["table_rows"])
        prepare = [sys.executable, "-m", "trainer.prepare", *overrides]
        subprocess.run(prepare, cwd=REPO, check=True, capture_output=True)
    results = {
        "shards_input_ms": input_ms(ShardSource(shards, seed=0), args.batches),
        "synthetic_input_ms": input_ms(SyntheticCriteo(SyntheticDataConfig()), args.batches),
        "shards_samples_per_s": train_samples_per_s(
            args.out / "run-shards",
            args.steps,
            "data=criteo",
            f"data.dir={shards}",
            on,
            "trainer.prefetch=off",
        ),
        "shards_auto_samples_per_s": train_samples_per_s(
            args.out / "run-shards-auto", args.steps, "data=criteo", f"data.dir={shards}", on
        ),
        "synthetic_samples_per_s": train_samples_per_s(args.out / "run-synthetic", args.steps, on),
    }
    results["shards_auto_input_ms"] = results["shards_input_ms"]
    for name in ("shards", "shards_auto", "synthetic"):
        step_ms = BATCH / results[f"{name}_samples_per_s"] * 1e3
        results[f"{name}_step_ms"] = step_ms
        results[f"{name}_input_share"] = results[f"{name}_input_ms"] / step_ms
    print(json.dumps(results, indent=2))
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
