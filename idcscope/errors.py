"""One small exception family: every message names the file and what is wrong."""


class IdcscopeError(Exception):
    """Base class of errors idcscope raises on purpose."""


class DataError(IdcscopeError):
    """A dataset, patch or split file is missing, malformed or inconsistent."""


class CheckpointError(IdcscopeError):
    """A checkpoint is missing, unreadable or does not describe a model."""


class WeightsUnavailableError(IdcscopeError):
    """Pretrained weights could not be found locally or downloaded."""


class NothingScoredError(DataError):
    """Inputs were given but none of them could be read and scored."""
