"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class DreampipeError(Exception):
    pass
