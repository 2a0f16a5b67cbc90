"""Typed errors. Each names what is wrong so an operator can act on it without reading code."""


class AnoclipError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AnoclipError):
    """The configuration is invalid; raised at start-up and names the offending key."""


class UnknownLineError(AnoclipError):
    """A frame or command names a product line that is not configured."""


class WeightsError(AnoclipError):
    """Pretrained weights could not be found or loaded."""


class ImageError(AnoclipError):
    """An image cannot be decoded or is not acceptable (truncated, too large, wrong type)."""


class AdapterMismatchError(AnoclipError):
    """An adapter file does not fit the model or line it is used with."""
