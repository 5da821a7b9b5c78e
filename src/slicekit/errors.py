"""The one exception type the CLI turns into a one-line message (no traceback)."""


class SlicekitError(Exception):
    """A user-facing problem: bad input, missing data, impossible settings."""
