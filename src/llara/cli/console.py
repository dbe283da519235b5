"""How the ``llara`` command line shows things: logging, rich tables, styled lines and one-line errors."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: bool, progress: bool = True) -> None:
    """llara's own log lines at INFO (every library's with ``verbose``). Without ``verbose`` the
    libraries below llara are quiet (:func:`quiet_libraries`)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, console=console(stderr=True))],
    )
    if not verbose:
        logging.getLogger("llara").setLevel(logging.INFO)
        quiet_libraries(progress)


def quiet_libraries(progress: bool) -> None:
    """Hide what transformers, huggingface_hub, accelerate and bm25s print on their own: warnings and
    reports such as transformers' "LOAD REPORT ... UNEXPECTED" (errors still show), and, unless
    ``progress``, their progress bars ("Loading weights", "Writing model shards").

    The environment variables reach the libraries when they are imported later (this process and its
    children); the calls reach those already imported. A user's own setting of the variables wins."""
    verbosity = os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this too
    for name in ("accelerate", "huggingface_hub", "bm25s"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.log_levels.get(verbosity, logging.ERROR))
        if not progress:
            hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped or captured output gets full-width tables instead of rich's 80-column default. No markup:
    # ids, titles, queries and paths are data and may hold "[/bold]" (styles go through rich.text.Text).
    return Console(stderr=stderr, width=None if stream.isatty() else 160, markup=False)


def styled(*parts) -> "object":
    """A line of plain strings and ``(text, style)`` pairs, printed without markup parsing."""
    from rich.text import Text

    return Text.assemble(*parts)


def print_table(results, title: str) -> None:
    from rich.table import Table

    from ..evaluation.runner import REPORTED

    table = Table(title=title)
    for col in ("dataset", "method", *REPORTED, "queries", "docs", "s"):
        table.add_column(col, justify="left" if col in ("dataset", "method") else "right")
    for r in results:
        table.add_row(r.dataset, r.label, *(f"{r.metrics[k]:.4f}" for k in REPORTED),
                      str(r.num_queries), str(r.num_docs), f"{r.seconds:.1f}")
    console().print(table)


def print_side_by_side(results, title: str) -> None:
    from rich.table import Table

    from ..evaluation.runner import side_by_side

    head, rows = side_by_side(results)
    if len(head) <= 2:
        return
    table = Table(title=title)
    for col in head:
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for row in rows:
        table.add_row(*row)
    console().print(table)


def fail(e: "Exception | str", status: int = 2) -> int:
    """Print ``error: <message>`` to stderr as plain text (the message is data, never markup)."""
    console(stderr=True).print(styled(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
    return status


class ConsoleReport:
    """How the demo shows its progress and tables on the console."""

    def line(self, *parts) -> None:
        console().print(styled(*parts))

    def table(self, results, title: str) -> None:
        print_table(results, title)


def print_hits(query: str, hits) -> None:
    """One query's search hits as a table."""
    from rich.table import Table

    table = Table(title=query)
    for col in ("rank", "score", "doc_id", "title"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h.score:.4f}", h.doc_id, h.title)
    console().print(table)
