"""Errors a user can cause. Each carries one line that says what is wrong and how to fix it.

The entry points catch :class:`HashexpError`, print its message on one line and exit with
status 2, so a bad override or a broken dataset never ends in a traceback.
"""


class HashexpError(Exception):
    """Base class for user-facing errors (bad config, bad data, impossible request)."""


class ConfigError(HashexpError, ValueError):
    """A config value is malformed or an impossible request was made."""


class DataError(HashexpError):
    """A dataset is missing, corrupt or has the wrong shape/dtype/range."""


class ExportError(HashexpError):
    """An exported model (ONNX, torch.export) failed, or its outputs differ from the PyTorch model's."""
