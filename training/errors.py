"""Errors raised by the training package for bad user input (data, configuration)."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class of errors the CLI reports as one line with exit code 2."""


class DataError(TrainingError):
    """A data file is missing or malformed; the message names the file (and line)."""


class ConfigError(TrainingError):
    """A configuration file or override is invalid; the message names the field."""
