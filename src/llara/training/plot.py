"""Loss curves from the JSONL training log, drawn with matplotlib's Agg canvas (no display, no
global pyplot state)."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_path
from .logging_utils import read_log


__all__ = ["plot_log", "LOSS_SKIP_KEYS"]

# Log entries that are not loss components.
LOSS_SKIP_KEYS = {"step", "epoch", "examples", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "examples_in_epoch"}


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_log(log_path: str | Path, png_path: str | Path, title: str | None = None) -> Path | None:
    """Draw the loss (and each logged component, smoothed) and the learning rate against steps.
    Written atomically; returns the PNG path, or None when the log has no entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_log(log_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    keys = [k for k in rows[-1] if k not in LOSS_SKIP_KEYS and isinstance(rows[-1][k], (int, float))]
    keys = ["loss"] + [k for k in keys if k != "loss"]
    window = max(1, len(rows) // 50)

    fig = Figure(figsize=(9, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k in keys:
        ys = [float(r[k]) if isinstance(r.get(k), (int, float)) else float("nan") for r in rows]
        if k == "loss":
            ax.plot(steps, ys, color="black", alpha=0.3 if window > 1 else 1.0, lw=1, label=None if window > 1 else "loss")
            if window > 1:
                ax.plot(steps, _smooth(ys, window), color="black", lw=2, label=f"loss (mean of {window})")
        else:
            ax.plot(steps, _smooth(ys, window), lw=1, label=k)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(title or Path(log_path).parent.name)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()

    png = Path(png_path)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
