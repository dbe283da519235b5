"""The JSONL training log (one line per optimizer step) and the progress bar."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ..io import open_atomic

logger = logging.getLogger(__name__)

__all__ = ["JsonlLog", "Progress", "read_log"]


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a JSONL log; a torn last line (a crash mid-write) is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: unreadable log line ignored", p, i)
    return rows


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class JsonlLog:
    """Append-only log of training steps. ``truncate_after(step)`` keeps entries up to ``step``
    (resuming from that step's checkpoint), rewriting the file atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        rows = [r for r in read_log(self.path) if int(r.get("step", 0)) <= step]
        with open_atomic(self.path) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in entry.items()}) + "\n")
            f.flush()


class Progress:
    """A tqdm bar (main process only) showing loss, tokens/s and the ETA to the last step."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float | None, lr: float) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if tokens_per_s:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
