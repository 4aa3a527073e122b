"""Exceptions a user can cause. Each message names the offending input and how to fix it."""

from __future__ import annotations


class SinkscopeError(Exception):
    """Base class for errors caused by user input (files, configs, names)."""


class ModelLoadError(SinkscopeError):
    """An LLM could not be found, converted or loaded."""


class TraceError(SinkscopeError):
    """A trace directory is missing, foreign, corrupt or of another schema version."""


class RecorderError(SinkscopeError):
    """The recorder was attached to a model it cannot instrument, or used wrongly."""
