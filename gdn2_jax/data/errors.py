"""The one error type of bad data: the message names the file (and line, row or offset)."""


class DataError(ValueError):
    """Data that cannot be trained or evaluated on as it is."""
