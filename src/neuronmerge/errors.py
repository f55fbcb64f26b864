"""Exceptions raised by neuronmerge.

Every failure a user can cause maps to one class here, so that the command line can print one clear
sentence and exit with a code that scripts can test, instead of a traceback from deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


class NeuronMergeError(Exception):
    """Base class of every error neuronmerge raises on purpose."""

    exit_code = 1
    #: What a command had found before it failed (evaluate: the parameter count when there is no
    #: test data); the command line adds it to its ``--json`` error object.
    partial: Mapping[str, Any] = MappingProxyType({})


class InvalidArgumentError(NeuronMergeError, ValueError):
    """An argument is out of range or of the wrong kind (ratio, threshold, criterion, ...)."""

    exit_code = 2


class UnknownArchitectureError(NeuronMergeError, ValueError):
    """An architecture name that the model registry does not know."""

    exit_code = 3


class CheckpointError(NeuronMergeError):
    """A checkpoint or saved model that is missing, unreadable, corrupt or of the wrong architecture."""

    exit_code = 4


class DatasetNotFoundError(NeuronMergeError, FileNotFoundError):
    """The files of a dataset are not where we looked; the message says how to get them."""

    exit_code = 5


class CaptureError(NeuronMergeError):
    """The model could not be traced into a graph; the message names the call to fix."""

    exit_code = 6


class OutputExistsError(NeuronMergeError, FileExistsError):
    """Refusing to overwrite an existing output file without ``force``."""

    exit_code = 7


class DatasetCorruptError(NeuronMergeError):
    """A dataset file exists but is not what it claims to be (bad header, truncated payload)."""

    exit_code = 8


class MissingDependencyError(NeuronMergeError, ImportError):
    """An optional feature's packages are not installed; the message names the extra to install."""

    exit_code = 9


class OutputWriteError(NeuronMergeError, OSError):
    """An output file could not be written (missing folder, no permission, disk full); any file that
    was there before is left as it was."""

    exit_code = 10
