"""How many fine-tuning steps ``llara recipe --budget-minutes`` can afford: after the pairs are made, a
short probe run (:data:`PROBE_STEPS`) measures the fine-tuning step, the index's time is estimated from
it, and the steps asked are cut to what fits the rest of the budget (:func:`budget_fit`), said either way
and recorded so that a resumed run keeps its choice (:func:`budget_steps`)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from ..io import iter_jsonl, write_json
from ..training.finetune import FinetuneConfig, finetune, finetune_train_config

__all__ = ["PROBE_STEPS", "budget_fit", "budget_steps", "step_seconds"]

PROBE_STEPS = 3  # fine-tuning steps of the budget's probe run (not run when finetune_steps is no more)


def step_seconds(log_path: Path) -> tuple[float, float]:
    """(median seconds per step after the first, tokens/s) of a training run's train_log.jsonl."""
    entries = [row for _, row in iter_jsonl(log_path)]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])] or [entries[0]["elapsed_s"]]
    times.sort()
    return times[len(times) // 2], float(entries[-1].get("tokens_per_s") or 0.0)


def budget_fit(budget_s: float, asked: int, *, spent_s: float, probe_s: float, step_s: float, index_s: float,
               overhead_s: float) -> int:
    """The fine-tuning steps a run of ``budget_s`` seconds can afford: at most ``asked``, at least 1. What
    was spent (adaptation, pairs) and the probe are gone; the index (``index_s``) and the fine-tuning's and the
    index's set-up (``overhead_s`` each, the model load the probe measured) are still to come.

    >>> budget_fit(1800, 128, spent_s=300, probe_s=20, step_s=4.0, index_s=120, overhead_s=5)
    128
    >>> budget_fit(1800, 128, spent_s=400, probe_s=45, step_s=12.0, index_s=400, overhead_s=5)
    78
    """
    left = budget_s - spent_s - probe_s - index_s - 2 * overhead_s
    return int(min(max(left // step_s, 1), asked))


def budget_steps(cfg, record: dict, model: str, train: Path, ft_cfg: FinetuneConfig,
                  say: Callable[[str], None]) -> int:
    """``cfg.finetune_steps`` (``cfg``: the run's :class:`~llara.pipelines.recipe.RecipeConfig`), or fewer where
    they would not fit ``cfg.budget_minutes``, from a measured step (recorded in ``record``, the run's
    ``recipe.json``, so a resumed run keeps its choice)."""
    out = Path(cfg.output)
    prev = record.get("budget")
    if prev and prev.get("budget_minutes") == cfg.budget_minutes and prev.get("pairs") == str(train) \
            and prev.get("asked") == cfg.finetune_steps:
        say(f"budget: {prev['steps']} fine-tuning steps, as chosen before ({prev['why']})")
        return prev["steps"]
    probe = out / "probe"
    if probe.exists():
        shutil.rmtree(probe)
    t0 = time.perf_counter()
    finetune(model, str(train), finetune_train_config(
        output_dir=str(probe), max_steps=PROBE_STEPS, batch_size=cfg.batch_size, save_every=0, seed=cfg.seed,
        cpu=cfg.cpu, progress=False, export=False), ft_cfg)
    probe_s = time.perf_counter() - t0
    step_s, tokens_per_s = step_seconds(probe / "train_log.jsonl")
    shutil.rmtree(probe)
    spent = sum(v.get("seconds", 0.0) for k, v in record.get("stages", {}).items() if k in ("adapt", "mine"))
    overhead = max(probe_s - PROBE_STEPS * step_s, 0.0)  # model load + set-up, paid again by the real run
    docs = sum(1 for _ in iter_jsonl(cfg.corpus))
    # encoding is a forward pass only: about 3x the training step's tokens per second (forward + backward)
    index_s = overhead + docs * cfg.max_passage_length / max(3 * tokens_per_s, 1e-9)
    steps = budget_fit(cfg.budget_minutes * 60, cfg.finetune_steps, spent_s=spent, probe_s=probe_s, step_s=step_s,
                       index_s=index_s, overhead_s=overhead)
    total = spent + probe_s + 2 * overhead + steps * step_s + index_s
    why = (f"budget {cfg.budget_minutes:g} min; adaptation and pairs took {spent:.0f} s, the probe {probe_s:.0f} s; "
           f"measured {step_s:.1f} s per fine-tuning step of {cfg.batch_size} x {cfg.group_size}; index of {docs} "
           f"documents estimated at {index_s:.0f} s; the whole run about {total / 60:.0f} min")
    if steps < cfg.finetune_steps:
        say(f"budget: {steps} of the {cfg.finetune_steps} fine-tuning steps asked fit ({why})" + (
            "; the budget is too small for a useful fine-tuning (under 8 steps)" if steps < 8 else "")
            + "; --budget-minutes 0 runs them all")
    else:
        say(f"budget: the {steps} fine-tuning steps asked fit ({why})")
    record["budget"] = {"budget_minutes": cfg.budget_minutes, "asked": cfg.finetune_steps, "steps": steps,
                        "step_s": round(step_s, 2), "index_estimate_s": round(index_s), "pairs": str(train), "why": why}
    write_json(out / "recipe.json", record)
    return steps
