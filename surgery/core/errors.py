"""The errors a user's input or machine causes, as opposed to bugs.

The command line turns every ``ClearSurgeryError`` (and the ``ValueError`` / ``OSError`` that
Python and libraries raise for bad values, missing files and full disks) into one ``error:`` line
and exit code 2; anything else is a bug and keeps its traceback. Each kind below is also a
subclass of the builtin a Python caller would catch for it.
"""

from __future__ import annotations


class ClearSurgeryError(Exception):
    """Base of every error clear-surgery raises for something the user can fix."""


class InvalidValueError(ClearSurgeryError, ValueError):
    """An argument or setting out of its range or not one of its choices."""


class FileFormatError(ClearSurgeryError, ValueError):
    """A file that is missing a part, truncated or damaged; the message names the file."""


class OutputPathError(ClearSurgeryError, ValueError):
    """An output path that cannot be written: exists, is a folder, unknown extension, no parent."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An output that exists and may not be replaced (no --overwrite, or not written by clear-surgery)."""


class NetworkError(ClearSurgeryError, ConnectionError):
    """The Hub cannot be reached (no network, or offline mode and nothing cached)."""


class MissingHardwareError(ClearSurgeryError, RuntimeError):
    """The command needs a GPU (or another device) this machine does not have."""


class MissingDependencyError(ClearSurgeryError, ImportError):
    """An optional library (TensorRT, ...) is not installed."""


class MismatchError(ClearSurgeryError, ValueError):
    """Two inputs that do not belong together (CLEAR layers of another model, another radius, ...)."""
