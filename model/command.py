"""How every command the user types reads its flags and ends: a mistake as one line, never a traceback.

Flags are parsed by a Parser with flag_type(parse, check): a value of the wrong kind or out of
range is a usage error naming the flag (status 2), printed as the error and a hint (the closest
flag to a misspelt one), not the whole usage, which --help shows. A command's `main` raises ValueError (bad data, a broken or mismatched file) or OSError (a missing
path, no permission) for what the user can fix; run_command prints that as one line on stderr and
exits with status 1. Usage errors are argparse's (status 2). Anything else is a bug and keeps its
traceback; `--debug` (or TRITONGPT_DEBUG=1) shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Callable, NoReturn

DEBUG_HELP = "show the full traceback of an error instead of one line"
Check = Callable[[Any], None]          # raises ValueError saying what is wrong with the value
EXPECTED = {int: "a whole number", float: "a number"}


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage error is two lines: the error, then for an unknown flag
    the known one closest to it ("did you mean --max-steps?"), else where the usage is."""

    def error(self, message: str) -> NoReturn:
        help_hint = f"{self.prog} --help lists every flag"
        self.exit(2, f"{self.prog}: error: {message}\n{self.closest_flag(message) or help_hint}\n")

    def closest_flag(self, message: str) -> str | None:
        """"did you mean --x?" for the first unrecognized flag in argparse's message that is close to a known one."""
        if not message.startswith("unrecognized arguments: "):
            return None
        known = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        for word in message.removeprefix("unrecognized arguments: ").split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
                if close:
                    return f"did you mean {close[0]}? ({self.prog} --help lists every flag)"
        return None


def at_least(low: float) -> Check:
    def check(value) -> None:
        if not value >= low:
            raise ValueError(f"must be at least {low}, got {value}")
    return check


def greater_than(low: float) -> Check:
    def check(value) -> None:
        if not value > low:
            raise ValueError(f"must be greater than {low:g}, got {value}")
    return check


def at_most(high: float) -> Check:
    def check(value) -> None:
        if not value <= high:
            raise ValueError(f"must be at most {high}, got {value}")
    return check


def flag_type(parse: Callable[[str], Any], *checks: Check) -> Callable[[str], Any]:
    """argparse type= that parses the text, then checks the value; either failing is a usage error."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {EXPECTED.get(parse, 'a valid value')}, got {text!r}") from None
        for check in checks:
            try:
                check(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return convert


def pick_device(name: str | None) -> str:
    """The device a --device flag names: "auto" (or None) is cuda when a GPU is visible, else cpu;
    a cuda device where none is visible is a ValueError naming the fix."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    return name


def debugging(argv: list[str] | None = None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("TRITONGPT_DEBUG") == "1"


def run_command(main: Callable[[], object]) -> None:
    """Run main() as the program; exits 1 with one line on stderr for a user's mistake."""
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):       # argparse's usage errors and plain exits keep their status
            raise
        if debugging():
            raise
        print(f"error: {e.code}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError) as e:
        if debugging():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
