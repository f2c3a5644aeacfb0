"""``python -m trainer.plan [overrides]``: see :mod:`trainer.plan.cluster`."""

from trainer.plan.cluster import main

main()
