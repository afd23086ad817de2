"""User-facing errors: one line, non-zero exit, no traceback (see ``tdlm.cli.main``)."""


class TdlmError(Exception):
    """An error caused by user input (config, files, checkpoints). The CLI prints
    ``error: <message>`` on one line and exits with status 2."""


class ConfigError(TdlmError, ValueError):
    """Invalid configuration value; the message names the field and the allowed values."""


class DataError(TdlmError):
    """Missing, empty or undecodable data."""


class CheckpointError(TdlmError):
    """Truncated, corrupted or incompatible checkpoint."""
