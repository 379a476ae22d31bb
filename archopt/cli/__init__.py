"""The ``archopt`` command: thin subcommands over importable functions.

``parser`` builds the command line; ``vision`` and ``language`` hold the subcommands (each
parses nothing, calls one typed function and prints); ``main`` runs one and turns a user's
mistake into one line on stderr."""

from __future__ import annotations

import sys

from archopt.cli.parser import build_parser
from archopt.cli.vision import BENCH_SUITES

__all__ = ["BENCH_SUITES", "build_parser", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (a bad argument, a missing or malformed file) is one
    line on stderr and exit code 2; anything else is a bug of archopt's, one line pointing to
    ``--debug`` (which shows the traceback) and exit code 1; Ctrl-C exits with 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (
        ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError
    ) as e:  # fmt: skip
        if debug:
            raise
        print(f"archopt: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        if debug:
            raise
        print(f"archopt: error: permission denied: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours, not the user's: say so, briefly
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(
            f"archopt: internal error: {type(e).__name__}: {first} (run with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    return 0


def run() -> None:
    """The ``archopt`` command: ``main``, then exit. Objects alive at exit are frozen first, so
    the interpreter's last garbage collection skips torch's hundreds of thousands of them:
    0.6 s of every process's wall time on the machine of benchmarks/RESULTS.md (issue 15)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)
