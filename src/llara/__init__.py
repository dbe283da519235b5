"""llara: turn any decoder-only LLM into a dense retriever with the LLaRA method."""
import os as _os

# bm25s (BM25, and the stopword list of the adaptation targets) runs ``jax.lax.top_k`` when it is
# imported and JAX is installed; JAX then grabs 75% of every visible GPU on first use, before llara's
# PyTorch model is even loaded. llara never needs JAX on a GPU: unless the user chose otherwise,
# keep JAX on the CPU and without preallocation. These must be set before JAX is first imported.
_os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_os.environ.setdefault("JAX_PLATFORMS", "cpu")

__version__ = "0.1.0"
