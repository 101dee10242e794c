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


def user_message(error: LGDError) -> str:
    """The message of ``error`` without the worker traceback torch's DataLoader wraps around it.

    An error raised in a DataLoader worker process is re-raised in the main process as the same type whose message
    is "Caught X in DataLoader worker process N. Original Traceback ... lgd.errors.X: <message>"; the user needs only
    <message>.
    """
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        return text[text.rindex(marker) + len(marker):].rstrip()
    return text


def count(n: int, noun: str) -> str:
    """"1 class", "2 classes", "3 categories": ``n`` and ``noun`` in the number ``n`` asks for (English plurals of
    the nouns lgd's messages count: +s, +es after s/x/ch/sh, y -> ies after a consonant)."""
    if n == 1:
        return f"{n} {noun}"
    if noun.endswith(("s", "x", "ch", "sh")):
        return f"{n} {noun}es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return f"{n} {noun[:-1]}ies"
    return f"{n} {noun}s"
