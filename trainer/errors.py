"""The one error type for a user's mistake: its message names the key (or file) and the fix.

Every layer raises it (config validation, checkpoints, planning); the entry
points print it as one line and exit 2.
"""


class ConfigError(ValueError):
    """A user error in the configuration; the message names the key and the fix."""
