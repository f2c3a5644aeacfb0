"""Planning: this run's sharding plan (``run_plan``), and plans for clusters you
do not have (``python -m trainer.plan``: ``cluster``)."""
