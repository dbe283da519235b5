"""The ``llara`` command line: :func:`main` parses the flags and runs one command.

- ``commands.py``: what each command does (read its flags, call one library function, print the outcome);
- ``configs.py``: one config dataclass per command; its fields are the flags, its ``__post_init__``
  checks the input before any work;
- ``options.py``: the flags several commands share (the option classes the configs inherit);
- ``args.py``: the parser, generated from the configs;
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
from ..training.config import config_from_args
from .console import fail, setup_logging

log = logging.getLogger("llara")


def build_parser() -> argparse.ArgumentParser:
    """The ``llara`` parser, each command bound to its ``commands.cmd_<name>`` function."""
    return cli_args.build_parser({name: getattr(commands, "cmd_" + name.replace("-", "_"))
                                  for name in cli_args.COMMANDS})


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    # third-party progress bars only on a terminal, and never under --no-progress (-v: everything shows)
    setup_logging(args.verbose, progress=getattr(args, "progress", True) and sys.stderr.isatty())
    try:
        if args.config_class is not None:  # checks the input, before any model loads or any file is written
            args.config = config_from_args(args, args.config_class)
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
    finally:
        end_distributed()


def end_distributed() -> None:
    """Tears down the process group a multi-process run (``accelerate launch`` / ``torchrun``) started, as
    ``Accelerator.end_training`` does, once the command is over: a process that exits with it still up
    leaves gloo's or NCCL's threads to the interpreter's shutdown (PyTorch warns, and a gloo thread can
    abort the process). Local to this process, no collective: safe after a failure too. The library's
    ``train`` leaves it up, as its caller may go on."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
