"""Errors that a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (config value, file, checkpoint) described in one line."""
