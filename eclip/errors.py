"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""


class EclipError(Exception):
    """A problem with the user's input or environment (exit code 2 by default)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def json_problem(e) -> str:
    """A json.JSONDecodeError as a whole phrase with its column: "Invalid control character at
    column 12" (e.msg alone ends in a dangling "at" and loses the position)."""
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"{msg} at column {e.colno}"
