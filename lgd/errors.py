"""Exceptions that carry a message meant for the user, not a traceback."""


class LGDError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(LGDError):
    """A config file or override names a key that does not exist or has a bad value."""


class DatasetError(LGDError):
    """A dataset file or record is missing or malformed; the message names file, record and field."""


class WeightsError(LGDError):
    """Pretrained weights were requested but cannot be found locally or downloaded."""


class TrainingError(LGDError):
    """Training cannot go on (for example a loss became NaN or infinite)."""
