"""shardrec's trainer: ``python -m trainer`` composes conf/, shards, trains, reports."""
