"""Errors a user can cause: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, model reference). The CLI prints it on one line."""


class ConfigError(UserError):
    """The config file or an override is invalid."""


class DataError(UserError):
    """A data file is missing or a row is malformed; the message names file, line and field."""


class ModelError(UserError):
    """A model reference cannot be resolved or loaded."""
