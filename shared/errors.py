"""The fedseg error hierarchy.

Every error fedseg raises on purpose derives from :class:`FedSegError`, so a
caller can tell a problem fedseg diagnosed from a bug.
"""


class FedSegError(Exception):
    """Base class of every error fedseg raises on purpose."""


class ConfigError(FedSegError, ValueError):
    """A configuration value (run config, node config or CLI option) is invalid.

    The message always names the offending key.
    """


class DataError(FedSegError):
    """A site's data is missing, unreadable or inconsistent.

    The message always names the offending file.
    """


class WeightsError(FedSegError):
    """Model weights do not match the model they are loaded into."""
