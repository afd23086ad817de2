"""Helpers at the bottom of the package (layer 0): atomic writes and hashes (``utils.io``),
machine description (``utils.machine``)."""
from .io import sha256_file  # noqa: F401
from .machine import machine_info  # noqa: F401
