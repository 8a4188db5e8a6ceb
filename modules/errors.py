"""Errors that a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (config value, file, checkpoint) described in one line."""


def check(condition: bool, message: str) -> None:
    """Raise a :class:`UserError` with ``message`` (one line naming the key, its value and what was
    expected) unless ``condition`` holds: a config group's checks, one line each."""
    if not condition:
        raise UserError(message)
