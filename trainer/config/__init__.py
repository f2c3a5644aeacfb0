"""Configuration: the Hydra schema, command-line composition, validation, the run directory."""
