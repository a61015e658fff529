"""The package's errors, at the bottom of the import graph so that every layer can raise them.

``WeightsError`` is a ``ValueError``: whatever is wrong lies in the input (a dataset, a
version, a model directory), not in the program. The CLI maps these classes to exit codes.
"""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights dataset, version or tensor is missing, malformed or corrupt."""


class VersionNotFoundError(WeightsError, LookupError):
    """The requested version, tag or tensor does not exist (the message lists what does)."""


class CorruptionError(WeightsError):
    """A version's stored bytes or metadata are inconsistent: corrupted, truncated or crafted.

    Also raised for a dataset or model directory whose files are not what they must be
    (a symbolic link out of it, a FIFO or device where a file belongs)."""


class CommittedError(WeightsError):
    """A step after a Lance commit failed: version ``version`` of ``uri`` exists, but what
    should have followed it (a pin, MLmodel) did not happen, so nothing references it (gc
    removes it). Raised as a subclass of the original error's type where Python allows, so
    that ``except OSError`` still catches an OSError that happened after a commit."""

    uri: str = ""
    version: int = 0


def after_commit(err: Exception, message: str, *, uri: str, version: int) -> CommittedError:
    """``err``, told as a CommittedError of version ``version`` of ``uri`` (see there)."""
    try:
        kind = type(f"{type(err).__name__}AfterCommit", (CommittedError, type(err)), {})
        out = kind(message)
    except TypeError:  # the two types cannot share an instance layout (OSError's), or a constructor
        out = CommittedError(message)
    out.uri, out.version = uri, version
    return out
