"""What every `sira` command shares: its exit codes, and the error a user's mistake raises.

A module of its own so that workers/cli.py and the command modules it dispatches to import it
alike: under ``python -m workers.cli`` that module is ``__main__``, and a class defined there
would be another class than the one its command modules raise.
"""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A flag, a file or a setting the user got wrong: exit 2 with one line."""
