"""How every command the user types ends: a mistake in its input as one line, never a traceback.

A command's `main` raises ValueError (bad data, a broken or mismatched file) or OSError (a missing
path, no permission) for what the user can fix; run_command prints that as one line on stderr and
exits with status 1. Usage errors are argparse's (status 2). Anything else is a bug and keeps its
traceback; `--debug` (or TRITONGPT_DEBUG=1) shows the traceback of every error.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_HELP = "show the full traceback of an error instead of one line"


def debugging(argv: list[str] | None = None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("TRITONGPT_DEBUG") == "1"


def run_command(main: Callable[[], object]) -> None:
    """Run main() as the program; exits 1 with one line on stderr for a user's mistake."""
    try:
        main()
    except (ValueError, OSError) as e:
        if debugging():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
