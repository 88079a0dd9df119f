"""The one exception type for mistakes a user can fix; `main` prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's data, paths or config, with a message that says what to do."""


def first_line(error: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: what a one-line error quotes."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
