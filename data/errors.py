"""The one error of the data package."""


class DataError(ValueError):
    """Bad input data: a file, a sample or a manifest key that is not what it should be; the message names it."""
