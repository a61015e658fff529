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
