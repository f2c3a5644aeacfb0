"""A hung writer in a follow job publishing every N steps (slow tier).

One partition of 8 steps, ``online.publish_every_steps=4``, and ``v1``'s writer
hangs (``SHARDREC_FAULT_PUBLISH_HANG=1``: it writes its bundle, then never
reports) under ``online.publish_timeout_s=150`` (longer than a genuine export on
a loaded machine): training goes on while it hangs, the publish at step 8 waits
for it until the timeout kills it, ``v1`` is dropped (the partition's
``publish_error``, the summary's ``errors``, no hidden directory left), and ``v2``
(step 8) is published and named by ``LATEST``. Publishing every N steps without
a hang: tests/test_follow.py (follow mode) and tests/test_publish.py (the walk);
the timeout itself, cheaply: tests/test_publish.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_follow import STEPS, _cfg, add_day, records, scores_its_sample, stamp
from trainer.online.publish import HANG_ENV, latest_name, versions
from trainer.train import train

EVERY = STEPS // 2
PUBLISH = [
    "online.publish=true",
    f"online.publish_every_steps={EVERY}",
    "online.publish_keep=3",
    "online.publish_timeout_s=150",
    "online.idle_timeout_s=0.3",
]


@pytest.mark.slow
def test_a_hung_writer_is_dropped_and_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    dataset = tmp_path / "days"
    add_day(dataset, 0)
    run_dir = tmp_path / "run"
    monkeypatch.setenv(HANG_ENV, "1")
    summary = train(_cfg(dataset, *PUBLISH), run_dir=run_dir)
    assert summary["partitions"] == ["day_0"]  # trained to its end
    exports = run_dir / "exports"
    assert versions(exports) == [2] and latest_name(exports) == "v2"
    assert not [p.name for p in exports.iterdir() if p.name.startswith(".")]
    v2 = stamp(exports, 2)
    assert (v2["step"], v2["partition"], v2["index"]) == (STEPS, "day_0", 0)
    assert scores_its_sample(exports / "v2") < 1e-5
    (record,) = records(run_dir)
    assert record["publish_count"] == 2 and record["publish_version"] == "v2"
    assert record["publish_error"].startswith("TimeoutError: the writer ran past")
    assert summary["publish"]["errors"] == [record["publish_error"]]
    assert record["publish_wait_s"] > 10  # the step-8 publish waited for the timeout
