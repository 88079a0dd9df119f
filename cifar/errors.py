"""The one exception type for mistakes a user can fix; `main` prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's data, paths or config, with a message that says what to do."""
