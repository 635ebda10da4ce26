"""User-facing errors: one line that says what is wrong and what to do, exit status 2."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong image shape, weights offline).

    Scripts catch it at the top (see `cli_main`), print one line and exit with status 2.
    """


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message names the key."""


def cli_main(fn: Callable[..., object]) -> Callable[..., None]:
    """Decorate a script's main(): a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except UserError as err:
            msg = " ".join(str(err).split())  # always one line
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: a bad command line is a UserError (exit 2 through `cli_main`),
    not argparse's usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see --help)")
