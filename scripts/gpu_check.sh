#!/usr/bin/env bash
# The GPU check, in one call on a lent H100/H200 with the GPU stack installed from a
# wheel kit carried onto the machine (torch 2.11.0+cu130, fbgemm-gpu 1.6.0, torchrec 1.6.1;
# benchmarks/GPU.md says how the runs so far were made):
#   run carry [.gpu/kit, .gpu/p1]  command: true
#   run carry [.gpu/p2]            command: true
#   run carry [.gpu/p3]            command: bash .gpu/kit/install.sh && . .gpu/env.sh && bash scripts/gpu_check.sh
# Runs the gpu test tier, the DLRM-DCNv2 shape (scaled to one device) through
# python -m benchmarks.bench, and the fused embedding forward against a device-to-device
# copy (python -m benchmarks.gpu_bandwidth), and training from prepared shards with the
# batches inline and built ahead, pinned (python -m benchmarks.shard_input). Logs go to
# $OUT (default outputs/gpu-check); the
# last lines printed are a short table. Each part has its own time limit, so a
# hang in one still leaves the others' results.
set -uo pipefail
OUT=${OUT:-outputs/gpu-check}
PY=${PYTHON:-python3}
BATCH=${GPU_BENCH_BATCH:-32768}
MAX_ROWS=${GPU_BENCH_MAX_ROWS:-4000000}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY - <<'PYEOF'
import importlib.metadata as md, platform, torch
names = ["fbgemm-gpu", "fbgemm_gpu", "torchrec"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}),",
      ", ".join(found))
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== pytest -m gpu"
timeout ${GPU_PYTEST_S:-180} $PY -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider > "$OUT/pytest.log" 2>&1
pytest_rc=$?
tail -n 25 "$OUT/pytest.log"

echo "== bench: DLRM-DCNv2 shape, one device"
timeout ${GPU_BENCH_S:-220} $PY -m benchmarks.bench --device cuda --world-size 1 --shapes dcnv2 \
  --contenders shardrec,shardrec_pregen,torchrec,dense --batch-size "$BATCH" \
  --max-rows "$MAX_ROWS" --warmup 3 --steps 10 --repeats 5 --breakdown-steps 5 \
  --timeout-s 215 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -n 22 "$OUT/bench.log"

echo "== fused embedding forward vs device-to-device copy"
timeout ${GPU_BW_S:-70} $PY -m benchmarks.gpu_bandwidth --batch-size 16384 --max-rows "$MAX_ROWS" \
  --out "$OUT/bandwidth.json" > /tmp/bandwidth.log 2>&1
bw_rc=$?
tail -n 5 /tmp/bandwidth.log

echo "== shard input: the default model trained from prepared shards, prefetch off / auto"
timeout ${GPU_SHARDS_S:-100} $PY -m benchmarks.shard_input "$OUT/shards" --rows 131072 --steps 200 \
  --batches 50 --device cuda > "$OUT/shards.log" 2>&1
shards_rc=$?
tail -n 14 "$OUT/shards.log"

$PY - "$OUT" "$pytest_rc" "$bench_rc" "$bw_rc" "$shards_rc" <<'PYEOF'
import json, re, statistics, sys
from pathlib import Path
out, pytest_rc, bench_rc, bw_rc, shards_rc = sys.argv[1], *sys.argv[2:]
print("\n| check | result |\n| --- | --- |")
log = Path(out, "pytest.log").read_text() if Path(out, "pytest.log").exists() else ""
m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?) in [\d.]+s", log, re.M)
print(f"| pytest -m gpu (rc {pytest_rc}) | {m[-1] if m else 'no summary'} |")
try:
    r = json.loads(Path(out, "bench", "dcnv2.json").read_text())
    for name, c in r["contenders"].items():
        xs = c["samples_per_sec"]
        print(f"| {r['shape']} {name}, batch {r['batch_size']} | {statistics.median(xs)/1e6:.3f} M samples/s "
              f"({min(xs)/1e6:.3f}-{max(xs)/1e6:.3f}) |")
except Exception as e:
    print(f"| bench (rc {bench_rc}) | failed: {e} |")
try:
    b = json.loads(Path(out, "bandwidth.json").read_text())
    print(f"| D2D copy | {b['copy_gbps']:.0f} GB/s |")
    for k in ("uniform", "zipf"):
        print(f"| embedding forward, {k} ids | {b[f'forward_{k}_gbps']:.0f} GB/s = "
              f"{100*b[f'forward_{k}_fraction_of_copy']:.0f}% of copy |")
except Exception as e:
    print(f"| bandwidth (rc {bw_rc}) | failed: {e} |")
try:
    s = json.loads(Path(out, "shards", "bench.json").read_text())
    for k in ("shards", "shards_auto", "synthetic"):
        print(f"| default model from {k} (batch 1024) | {s[f'{k}_samples_per_s']:,.0f} samples/s |")
except Exception as e:
    print(f"| shard input (rc {shards_rc}) | failed: {e} |")
PYEOF
