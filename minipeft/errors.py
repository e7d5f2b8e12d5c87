"""One exception type for mistakes in what the user gave us (files, keys, arguments), and the checks
that raise it.

Scripts catch it and print its one-line message with exit code 2, no traceback. Anything else that
escapes is a bug in minipeft and keeps its traceback.
"""

import argparse


class BadInput(Exception):
    """A user-facing error: the message names the file, key or argument and what was expected.

    Always one line: line breaks inside (from a quoted value or a library's message) are shown escaped."""

    def __init__(self, message: str):
        super().__init__(one_line(str(message)))


LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # every character str.splitlines breaks at


def one_line(text: str) -> str:
    """`text` with its line breaks shown escaped (a quoted value or a library's message may hold some)."""
    return "".join(ch.encode("unicode_escape").decode() if ch in LINE_BREAKS else ch for ch in text)


MiniPeftError = BadInput  # its earlier name


def require(config: dict, key, kind, source, low=None, high=None, default=None):
    """config[key], checked to be of `kind` (a type or a tuple of types) and within [low, high].

    `source` names the file in the error; a missing key takes `default`, which must pass the same checks."""
    value = config.get(key, default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    right_kind = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # True is no number
    in_range = not is_number or (value == value and (low is None or value >= low) and (high is None or value <= high))
    if not (right_kind and in_range):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        limits = f" in [{low}, {high}]" if low is not None else ""
        raise BadInput(f"{source}: key {key!r} should be {expected}{limits}, got {value!r}")
    return value


def require_mapping(config: dict, key, kind, source, high):
    """config[key] as {name: value}, each value of `kind` in (0, high]; absent or null is {}."""
    mapping = require(config, key, dict, source, default={}) if config.get(key) is not None else {}
    for name, value in mapping.items():
        require({name: value}, name, kind, f"{source} ({key})", 1e-9, high)
    return mapping


def refuse_unhonoured(config: dict, read, not_math, only_default: dict, source):
    """Every key of a config is read, changes nothing, or is at a value that changes nothing: else refused.

    A key this code has never heard of is accepted only while it is unset (null, false, empty)."""
    for key, value in config.items():
        unset = value in (None, False, [], {}, "")
        if key in read or key in not_math or unset and key not in only_default:
            continue
        if key in only_default and value in (only_default[key], None):
            continue
        what = f"only {only_default[key]!r} is supported" if key in only_default else "minipeft does not know this key"
        raise BadInput(f"{source}: key {key!r} is {value!r}; {what}")


def run_cli(main):
    """Run a command-line entry point: a BadInput becomes `error: ...` on stderr and exit code 2.

    Under torchrun every process checks the same arguments: rank 0 alone reports what they all found, and
    another rank speaks only of what happened to it (its errors say which rank). A reader that stops early
    (`minipeft nearest ... | head -3`) ends it quietly, as it would any Unix tool."""
    import os
    import sys
    import time

    try:
        return main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit-time flush would fail again
        sys.exit(141)  # 128 + SIGPIPE, the status of a tool the pipe ended
    except BadInput as e:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun
        if os.environ.get("RANK", "0") == "0" or str(e).startswith("rank "):
            print(f"error: {e}", file=sys.stderr)
        elif several:  # rank 0 says it: torchrun ends this process once it has,
            time.sleep(30)  # but would end rank 0 first, unheard, if this one exited before it
        if several:  # no teardown that could wait on a dead process
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its mistakes said as ours are: one line on stderr, exit code 2 (argparse's own
    prints the usage first)."""

    def error(self, message):
        import sys

        print(one_line(f"error: {self.prog}: {message} (see {self.prog} --help)"), file=sys.stderr)
        sys.exit(2)
