"""The forked bundle writer (trainer/online/publish.py) and what the parent leaves behind.

A process that ran distributed work before (a test worker, a job that re-initialised
its process group) may hold a gloo ``ProcessGroup`` that only a reference cycle keeps:
garbage the collector has not reached yet. If the forked writer's collector finalises
it, the destructor waits on gloo threads that exist only in the parent, and the writer
(and the training waiting on it) hangs: seen in ``make test``, in ``torch.export``.
The publisher freezes the collector's view across the fork; without that this test's
child hangs (checked) and the test times out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.processes import run

SCRIPT = """
import gc, json, sys
from pathlib import Path
import torch.distributed as dist
from tests.distributed import free_port
from trainer.online.publish import Publisher

gc.disable()  # the group stays garbage until the writer collects
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
)
group = dist.new_group([0])
dist.barrier(group)
box = [group]
box.append(box)  # only a cycle holds the group once the world forgets it
del group, box
dist.destroy_process_group()


def write(directory: Path) -> dict:
    gc.collect()  # what torch.export's allocations trigger sooner or later
    directory.mkdir()
    (directory / "x").write_text("ok")
    return {"ok": True}


publisher = Publisher(Path(sys.argv[1]), keep=2, timeout_s=60)  # within the test's 120 s
publisher.start(write, info={})
publisher.wait()
print(json.dumps(publisher.finished()))
"""


def test_garbage_gloo_group_in_the_parent_does_not_hang_the_writer(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    proc = run(
        [sys.executable, "-c", SCRIPT, str(exports)],
        cwd=REPO,
        timeout=120,  # hangs without the fix; a few seconds with it
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["result"] == {"ok": True}, record
    assert (exports / "LATEST").read_text().strip() == "v1"
    assert (exports / "v1" / "x").read_text() == "ok"
