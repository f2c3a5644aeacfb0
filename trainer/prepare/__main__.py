"""``python -m trainer.prepare data=criteo 'data.raw=[FILE,...]' data.dir=DIR``.

Composes the same config as the trainer (``conf/``, any override), prepares
``data`` (see :func:`trainer.prepare.prepare`) and prints what it wrote. A bad
input or setting ends in one line naming the file and line (or the key) and
exit status 2.

Example::

    python -m trainer.prepare data=criteo 'data.raw=[day_0,day_1]' data.dir=data/criteo
    python -m trainer.prepare data=table 'data.raw=[events.parquet]' data.dir=data/events \\
        data.label=clicked 'data.categorical=[user,item]'
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from trainer.config.run_dir import register_resolvers
    from trainer.config.schema import register_configs
    from trainer.prepare import PrepareError, prepare

    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
        data = OmegaConf.to_object(cfg.data)
    except (HydraException, OmegaConfBaseException) as err:
        from trainer.config.compose import explain  # names the key and the allowed values

        print(f"shardrec: config error: {_one_line(explain(err, argv))}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = prepare(data)
    except PrepareError as err:
        print(f"shardrec: prepare error: {_one_line(err)}", file=sys.stderr)
        return 2
    meta = result.metadata
    skipped_rows = result.skipped or meta.bad_rows
    if result.up_to_date:
        print(f"{result.directory}: up to date (same settings and inputs), nothing to do")
        _print_skipped(result.skipped)
        return 0
    if result.appended:
        names = ", ".join(result.appended)
        count = f"{len(result.appended)} partition{'s' if len(result.appended) > 1 else ''}"
        print(f"{data.dir}: appended {count} ({names}); the last:")
        if all(name.startswith("1970-") for name in result.appended):
            print(
                "  note: every time fell in 1970, as times counted from 1970-01-01 in the wrong "
                "unit do (or a log's own clock); if the column holds milliseconds set "
                "data.timestamp_unit=ms, if dates written as digits (Avazu's hour 14102100) "
                "data.timestamp_format=%y%m%d%H",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - start
    rows = sum(s.num_rows for s in meta.splits.values())
    splits = ", ".join(f"{name} {s.num_rows:,} rows" for name, s in meta.splits.items())
    print(f"{result.directory}: {splits} in {seconds:.1f}s ({rows / seconds:,.0f} rows/s)")
    print(
        f"  {len(meta.features)} features ({meta.mapping['kind']}), "
        f"{meta.num_dense} dense, tables {[f.num_embeddings for f in meta.features]}"
    )
    _print_skipped(skipped_rows)
    return 0


def _print_skipped(bad_rows: dict) -> None:
    skipped = bad_rows.get("skipped", 0)
    if skipped:
        print(f"  skipped {skipped} bad rows: {bad_rows['by_reason']}")
        for example in bad_rows.get("examples", [])[:3]:
            print(f"    {example}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
