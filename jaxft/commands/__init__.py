"""The subcommands of the `jaxft` command line, one module each (listed in `jaxft.cli.COMMANDS`).

A command module defines

    def register(subparsers) -> None   # subparsers.add_parser(...), its arguments, set_defaults(run=run)
    def run(args) -> int               # the exit code; results on stdout, progress and logs on stderr

and raises `CommandError` for anything the user can fix (a missing file, a bad value): the command line prints
its message as one line, without a traceback, and exits with code 1.
"""


class CommandError(Exception):
    """An error in what the user asked for, reported as one line."""
