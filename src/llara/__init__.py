"""llara: turn any decoder-only LLM into a dense retriever with the LLaRA method.

The public API, one import away::

    from llara import Encoder, Searcher, build_index, evaluate, pretrain, finetune, run_recipe

Each name is the library object itself (:class:`llara.modeling.encoder.Encoder`, ...), imported on
first use, so ``import llara`` stays cheap: nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os as _os
from typing import Any

# bm25s (BM25, and the stopword list of the adaptation targets) runs ``jax.lax.top_k`` when it is
# imported and JAX is installed; JAX then grabs 75% of every visible GPU on first use, before llara's
# PyTorch model is even loaded. llara never needs JAX on a GPU: unless the user chose otherwise,
# keep JAX on the CPU and without preallocation. These must be set before JAX is first imported.
_os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_os.environ.setdefault("JAX_PLATFORMS", "cpu")

__version__ = "0.1.0"

# name -> (module, attribute): thin re-exports, resolved by name on first use (PEP 562). The package root
# sits in the bottom layer (every layer reads __version__ here; tests/test_layers.py), so it names the
# layers above only as strings and imports them only when a user asks for one of these names.
_EXPORTS: dict[str, tuple[str, str]] = {
    "Encoder": ("llara.modeling.encoder", "Encoder"),
    "Searcher": ("llara.retrieval.searcher", "Searcher"),
    "build_index": ("llara.retrieval.index", "build_index"),
    "evaluate": ("llara.evaluation.runner", "evaluate_datasets"),
    "pretrain": ("llara.training.pretrain", "pretrain"),
    "finetune": ("llara.training.finetune", "finetune"),
    "run_recipe": ("llara.pipelines.recipe", "run_recipe"),
}

__all__ = ["__version__", *_EXPORTS]


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
