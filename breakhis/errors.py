"""User errors: one clear line and exit code 2, no traceback. Bugs still raise."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input (bad flag, missing folder, bad file).

    The message says what is wrong, where, and what to do.
    """


def guard(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a script's main; a UserError prints one line to stderr and gives exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
