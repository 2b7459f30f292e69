"""The one error class of the data package: bad input, said in one line that names the file."""


class DataError(ValueError):
    """Data that is not what it claims (or cannot be read); the CLI prints it as `error: ...`."""
