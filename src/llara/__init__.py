"""llara: turn any decoder-only LLM into a dense retriever with the LLaRA method.

The public API, one import away::

    from llara import Encoder, Searcher, build_index, evaluate, pretrain, finetune, run_recipe

Each name is the library object itself (:class:`llara.modeling.encoder.Encoder`, ...), imported on
first use, so ``import llara`` (and ``llara --version``) stays cheap: nothing here imports torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> (module, attribute): thin re-exports, resolved lazily (PEP 562)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Encoder": ("llara.modeling.encoder", "Encoder"),
    "Searcher": ("llara.retrieval.searcher", "Searcher"),
    "build_index": ("llara.retrieval.index", "build_index"),
    "evaluate": ("llara.evaluation.runner", "evaluate_datasets"),
    "pretrain": ("llara.training.pretrain", "pretrain"),
    "finetune": ("llara.training.finetune", "finetune"),
    "run_recipe": ("llara.recipe", "run_recipe"),
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .evaluation.runner import evaluate_datasets as evaluate
    from .modeling.encoder import Encoder
    from .recipe import run_recipe
    from .retrieval.index import build_index
    from .retrieval.searcher import Searcher
    from .training.finetune import finetune
    from .training.pretrain import pretrain


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'llara' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
