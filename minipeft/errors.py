"""One exception type for mistakes in what the user gave us (files, keys, arguments).

Scripts catch it and print its one-line message with exit code 2, no traceback. Anything else that
escapes is a bug in minipeft and keeps its traceback.
"""


class MiniPeftError(Exception):
    """A user-facing error: the message names the file, key or argument and what was expected."""


def run_cli(main):
    """Run a command-line entry point: a MiniPeftError becomes `error: ...` on stderr and exit code 2."""
    import sys

    try:
        return main()
    except MiniPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
