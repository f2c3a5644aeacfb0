"""``python -m trainer.export CHECKPOINT_DIR``: see :mod:`trainer.export.offline`."""

from trainer.export.offline import main

main()
