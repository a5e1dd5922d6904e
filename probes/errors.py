"""Typed exceptions of topk-saturation.

Every error a user can cause by what they pass in (a model name, a text source, an
option, a run folder) is raised as a subclass of :class:`TopkSaturationError` with a
one-line message that says what was wrong and what to do. The command line prints that
line on stderr and exits with code 2; Python callers can catch the precise class.

Example:
    >>> from probes.errors import TopkSaturationError, UnknownModelError
    >>> issubclass(UnknownModelError, TopkSaturationError)
    True
"""

from __future__ import annotations


class TopkSaturationError(ValueError):
    """Base class of every user-facing error in topk-saturation."""


class UnknownModelError(TopkSaturationError):
    """A model spec that names no known model, folder or hub repository."""


class MissingPackageError(TopkSaturationError):
    """A model or text package that is not installed; the message names the pip command."""


class ModelLoadError(TopkSaturationError):
    """A model that exists in principle but could not be loaded here (e.g. no hub access)."""


class TextSourceError(TopkSaturationError):
    """A text source that is unknown, missing, empty or too short."""


class InvalidOptionError(TopkSaturationError):
    """An option value out of its allowed range."""


class RunFolderError(TopkSaturationError):
    """A run folder that is missing, incomplete, unwritable or from another model."""


class ProbeError(TopkSaturationError):
    """A probe that cannot be trained, loaded or applied as asked."""


class UnsupportedArchitectureError(TopkSaturationError):
    """A model whose architecture the logit lens cannot read."""


class ImageSourceError(TopkSaturationError):
    """An image source that is unknown, missing, empty or unreadable."""
