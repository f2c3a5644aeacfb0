"""Fails loudly if the installed stack breaks the FBGEMM <-> torch lock.

See docs/architecture.md, "The version lock".

Run by `make install`: a CUDA wheel sneaking into the CPU environment (through a
dependency resolving `torch` or `fbgemm-gpu`) would otherwise surface later as
an obscure load error inside torchrec.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

LOCK = {"2.13": "1.8", "2.11": "1.6", "2.12": "1.7", "2.14": "1.9"}


def main() -> int:
    import torch

    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    dists = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    problems = []
    cuda_pkgs = sorted(d for d in dists if d.startswith("nvidia-") or d == "fbgemm-gpu")
    if not torch.version.cuda and cuda_pkgs:
        problems.append(f"CUDA packages in a CPU environment: {cuda_pkgs}")
    fbgemm = next((d for d in ("fbgemm-gpu-cpu", "fbgemm-gpu") if d in dists), None)
    if fbgemm is None:
        problems.append("fbgemm-gpu-cpu is not installed")
    else:
        fb_minor = ".".join(md.version(fbgemm).split(".")[:2])
        if LOCK.get(torch_minor) != fb_minor:
            problems.append(
                f"{fbgemm} {md.version(fbgemm)} does not match torch {torch.__version__} "
                f"(needs fbgemm {LOCK.get(torch_minor, '?')}.x)"
            )
    import fbgemm_gpu  # noqa: F401  (loads the native ops: the real check)
    import torchrec

    if problems:
        print("stack check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(
        f"stack ok: torch {torch.__version__}, {fbgemm} {md.version(fbgemm)}, "
        f"torchrec {torchrec.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
