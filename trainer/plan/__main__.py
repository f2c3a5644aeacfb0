"""``python -m trainer.plan [overrides]``: see :mod:`trainer.plan.cluster`.

The command line is composed and checked first, so a mistake is one line in
under a second, before the planner's imports (torch, torchrec) are paid for.
"""

import sys

from trainer.config.compose import exit_on_compose_error
from trainer.config.run_dir import register_resolvers
from trainer.config.schema import register_configs

register_configs()
register_resolvers()
exit_on_compose_error(sys.argv[1:])  # one line and exit 2, before Hydra's report

from trainer.plan.cluster import main  # noqa: E402  (after the check: heavy)

main()
