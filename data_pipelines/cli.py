"""Command-line plumbing shared by every CLI: bad input is one `error: ...` line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from data_pipelines.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single `error: ...` line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with whitespace runs collapsed."""
    return " ".join(str(err).split()) or type(err).__name__


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI body: a UserError, or an OSError (permissions, full disk, a path that is a
    file), becomes `error: ...` + exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        code = main()
    except UserError as err:
        fail(one_line(err))
    except OSError as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        fail(f"{err.strerror or one_line(err)}{where}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
