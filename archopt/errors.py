"""One family of errors for what a caller got wrong, each a ``ValueError``.

``ArchoptError(argument, expected, got)`` writes the sentence every error here follows:
``window must be >= 1, got 0``; the command line prints it on one line and exits with 2.
Subclasses say which kind of input was wrong, for callers that want to tell them apart.
"""

from __future__ import annotations


class ArchoptError(ValueError):
    """``{argument} must be {expected}, got {got!r}`` (or a whole sentence of its own)."""

    def __init__(self, argument: str, expected: str | None = None, got=None) -> None:
        self.argument, self.expected, self.got = argument, expected, got
        message = argument if expected is None else f"{argument} must be {expected}, got {got!r}"
        super().__init__(message)


class CheckpointError(ArchoptError):
    """A checkpoint or cache file that is malformed, inconsistent or unsafe."""


class DataError(ArchoptError):
    """A data set file (an image, a CIFAR-10 batch) that is malformed or unreadable."""


class ResourceError(ArchoptError):
    """A request that would need more memory or disk than the machine has."""
