"""The ``retom-jax`` command line: one module per subcommand, each with an
``add_parser(sub)`` that registers it; the options they share are defined once in
:mod:`.options`."""
from __future__ import annotations

import argparse
import sys
import warnings

from . import bench, eval, generate, serve, train
from .options import HelpFormatter, Parser

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (generate, eval, train, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="retom-jax", formatter_class=HelpFormatter,
        description="Diffusion models in JAX with token merging (ToMe, ReToM, ToDo).")
    parser.add_argument("--version", action="version", version=f"retom-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def _show_warning(seen):
    """``warnings.showwarning`` for the command line: each message once, on one line."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"retom-jax: warning: {text}", file=sys.stderr, flush=True)
    return show


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # shown once each by _show_warning
        warnings.showwarning = _show_warning(set())
        return args.handler(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
