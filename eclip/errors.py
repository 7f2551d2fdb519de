"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""


class EclipError(Exception):
    """A problem with the user's input or environment (exit code 2 by default)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
