"""``python -m trainer.report DIR``: the sweep report of a Hydra multirun directory.

``report.md``, ``report.csv`` and ``pareto.png`` in ``DIR`` (see
``trainer.report.sweep``); ``make sweep-report DIR=...`` runs this. The precision
x QAT sweep's compression table is ``python -m trainer.report.compression DIR``.
"""

from __future__ import annotations

import sys

from trainer.report.sweep import main

if __name__ == "__main__":
    sys.exit(main())
