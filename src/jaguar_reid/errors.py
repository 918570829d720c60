"""The error every user-facing mistake is raised as; `io_utils.run_main` turns it into one line
and exit 2. Its own module so that anything may import it without importing `io_utils`."""


class UserInputError(ValueError):
    """A config, CSV or file a user gave that cannot be used; the message says which and why."""
