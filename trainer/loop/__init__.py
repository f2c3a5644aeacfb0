"""The training loop: the ``Trainer``, its torchrec train pipeline."""
