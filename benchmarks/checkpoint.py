"""Checkpoint cost: how long the training loop is blocked per save, sync vs async.

Runs ``python -m trainer`` (one process) on the default model and on one with
10x larger tables, each with ``trainer.async_checkpoint=false`` and ``true``,
checkpointing every ``--every`` steps, and prints per save the loop's blocked
time, the step time and their ratio (from each run's ``summary.json``:
``checkpoint_blocked_s_mean``, ``train_time_s / steps``).

Example::

    .venv/bin/python -m benchmarks.checkpoint --steps 200 --every 50 --out outputs/bench-ckpt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARDINALITIES = [1460, 583, 20000, 20000, 305, 24, 12517, 633, 10, 20000, 5683, 20000, 3194]
CARDINALITIES += [27, 14992, 20000, 10, 5652, 2173, 10, 20000, 18, 15, 20000, 105, 20000]


def run(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-checkpoint")
    args = parser.parse_args()
    common = [
        f"trainer.num_steps={args.steps}",
        f"trainer.checkpoint_every_steps={args.every}",
        f"trainer.eval_every_steps={args.steps}",
        "data.num_eval_samples=4096",
        "trainer.progress_bar=false",
        "trainer.plot=false",
        "trainer.checkpoint_keep=1",
    ]
    models = {
        "default": [],
        "tables_x10": ["data.cardinalities=[" + ",".join(str(10 * c) for c in CARDINALITIES) + "]"],
    }
    print("| model | table bytes | save | blocked per save (s) | step (s) | blocked / step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, extra in models.items():
        for mode in ("sync", "async"):
            flag = f"trainer.async_checkpoint={'true' if mode == 'async' else 'false'}"
            s = run(f"{model}-{mode}", [*common, *extra, flag], args.out)
            step_s = s["train_time_s"] / s["steps"]
            blocked = s["checkpoint_blocked_s_mean"]
            print(
                f"| {model} | {s['embedding_bytes']:,} | {mode} | {blocked:.3f} | "
                f"{step_s:.4f} | {blocked / step_s:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
