"""What every command line of the project shares: one range for an input size, argparse types that name
the range they refuse, and the entry point that turns a problem the user can fix into one line.

    p.add_argument("--size", type=bounded(int, *SIZE_RANGE))
    sys.exit(run_main(lambda: do_the_work(args)))     # 0, or `error: <one line>` and the error's exit code
"""

import argparse
import sys

from .errors import UserError

SIZE_RANGE = (32, 8192)  # a model input size: the first stage's 8x8 key reduction needs 32; 8192: a sane limit


def bounded(kind, low, high):
    """argparse `type=`: a number of `kind` within [low, high], or an error naming the range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {text}")
        return value
    return parse


def run_main(work) -> int:
    """`work()`, as a command line's exit status: 0 (or the int it returns), or a UserError printed as
    `error: <message>` (the message names the file, key, flag or value) with its type's exit code."""
    try:
        result = work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
