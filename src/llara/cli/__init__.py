"""The ``llara`` command line: :func:`main` parses the flags and runs one command.

- ``commands.py``: what each command does (read its flags, call one library function, print the outcome);
- ``args.py``: the flags of every command and the objects they are turned into (an encoder, a fusion
  config, a training config);
- ``console.py``: logging, tables, styled lines and one-line errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from . import args as cli_args
from . import commands
from .console import fail, setup_logging

log = logging.getLogger("llara")


def build_parser() -> argparse.ArgumentParser:
    """The ``llara`` parser, each command bound to its ``commands.cmd_<name>`` function."""
    return cli_args.build_parser({name: getattr(commands, "cmd_" + name.replace("-", "_")) for name in (
        "evaluate", "mine", "pretrain", "finetune", "recipe", "export", "demo", "index", "merge", "search",
        "check-index", "serve", "loadtest")})


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.template is None:
        args.template = ["mean", "eos", "llara"]  # mean and eos share one forward pass
    # third-party progress bars only on a terminal, and never under --no-progress (-v: everything shows)
    setup_logging(args.verbose, progress=getattr(args, "progress", True) and sys.stderr.isatty())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except (ValueError, OSError) as e:  # bad input: DataError, TemplateError, missing/existing files ...
        if args.verbose:
            log.exception("%s", e)
        return fail(e)
    except Exception as e:  # a bug: one line, the traceback with -v
        if args.verbose:
            log.exception("unexpected error")
        return fail(f"unexpected {type(e).__name__}: {e} (rerun with -v for the traceback)", 1)
