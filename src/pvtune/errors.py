"""The errors pvtune raises for problems a user can fix.

Every user-facing error derives from :class:`PvtuneError`; its message says what is wrong and
what to do. The command line prints such an error as one line and exits with code 2; any other
exception is a bug in pvtune and keeps its traceback. Each subclass also derives from the
built-in exception a Python caller would expect (``ValueError`` for bad values, ``KeyError``
for unknown names), so ``except ValueError`` keeps working around library calls.
"""

from __future__ import annotations


class PvtuneError(Exception):
    """A problem the user can fix: bad input, a damaged file, an impossible setting."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(PvtuneError, ValueError):
    """A setting is out of range, of the wrong type, or does not fit the model."""


class UnknownNameError(PvtuneError, KeyError):
    """A name (method, strategy, representation, estimator) that nothing is registered under."""

    def __str__(self) -> str:  # KeyError would quote the message
        return PvtuneError.__str__(self)


class CheckpointError(PvtuneError, ValueError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the model."""


class DataError(PvtuneError, ValueError):
    """Text input that cannot be used (missing, malformed, too short)."""


class ModelError(PvtuneError, ValueError):
    """A model that cannot be loaded or is not a causal LM pvtune supports."""


class AssetError(PvtuneError, RuntimeError):
    """An offline asset could not be fetched or failed its checksum."""


class TrainingError(PvtuneError, RuntimeError):
    """Training cannot continue (a non-finite loss, a diverged model)."""


class OutputError(PvtuneError, OSError):
    """An output location that cannot be written (read-only, full, a file, the source)."""
