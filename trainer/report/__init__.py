"""What a run reports: eval metrics, ``metrics.jsonl`` and wandb, training-curve plots."""
