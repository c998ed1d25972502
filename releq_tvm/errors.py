"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class ReleqError(Exception):
    """Bad input or a missing resource the user can fix; the message says what is wrong and how to fix it."""
