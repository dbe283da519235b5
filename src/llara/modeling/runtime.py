"""Run the encoder's forward pass in another runtime: int8 with ONNX Runtime.

Only the stock forward that returns ``last_hidden_state`` is replaced (``Encoder.forward`` calls
it). Tokenisation, padding, the pooling (LLaRA slots, EOS, mean) and the normalisation stay
:mod:`llara.modeling.embed`'s, so every pooled position is the same as with torch.

``onnx-int8``: the decoder stack (after the template's slot tokens were added to the vocabulary)
is exported once with ``torch.onnx`` in fp32, then quantised by ONNX Runtime's dynamic
quantisation: weights int8 per output channel, activations quantised per batch at run time (u8 x s8
matrix products, VNNI kernels on CPUs that have them), except the MLP's output products, whose
input carries the outlier activations of LLMs (they stay fp32). On an x86 CPU without VNNI, ONNX
Runtime's u8 x s8 kernel (``vpmaddubsw``) adds pairs of products in saturating 16-bit integers: there
the weights are quantised to 7 bits (``reduce_range``, ONNX Runtime's advice), which keeps the sums in
range (measured on an AVX2-only EPYC: 8-bit weights put 7% of a tiny model's vector components off by
up to 0.077). The result is cached under
``$LLARA_CACHE/runtimes/<key>/model.onnx``, keyed by the weights' fingerprint, the vocabulary size
and the onnx / onnxruntime / torch versions, so later loads take seconds. The export uses torch's
``torch.export``-based ONNX exporter (batch and length stay dynamic; it needs onnxscript).

Needs the ``int8`` extra: ``pip install 'llara[int8]'``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..io import atomic_dir, cache_root

log = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "LastHidden", "OnnxInt8Forward", "export_onnx_int8", "load_runtime"]

RUNTIMES = ("torch", "onnx-int8")
MODEL_FILE = "model.onnx"
OPSET = 18
QUANTISATION = "onnx-int8|dynamic|matmul|per-channel|mlp-output-fp32"  # part of the cache key
# Above this many bytes of fp32 weights, ONNX's 2 GB protobuf limit needs the weights beside the graph.
_EXTERNAL_DATA_BYTES = 1_500_000_000


def _check(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


class LastHidden(torch.nn.Module):
    """The base model as a function of (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _versions() -> str:
    import onnx
    import onnxruntime

    return f"onnx {onnx.__version__}|onnxruntime {onnxruntime.__version__}|torch {torch.__version__}|opset {OPSET}"


def int8_reduce_range(machine: str | None = None, flags: "set[str] | None" = None) -> bool:
    """Whether weights should be quantised to 7 bits here: an x86 CPU without VNNI (AVX512-VNNI or
    AVX-VNNI), or one whose CPU flags cannot be read (the safe choice). ``machine`` and ``flags``
    default to this machine's (``platform.machine()``, the flags of ``/proc/cpuinfo``)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM's int8 kernels do not saturate this way
    if flags is None:
        from .precision import cpuinfo

        listed = cpuinfo("flags")
        if listed is None:
            return True
        flags = set(listed.split())
    return not ({"avx512_vnni", "avx_vnni"} & flags)


def runtime_key(fingerprint: str, vocab_size: int) -> str:
    """Cache key of an exported model: the weights, the vocabulary (slot tokens) and the tool versions."""
    quantisation = QUANTISATION + ("|reduce-range" if int8_reduce_range() else "")
    return hashlib.sha256(f"{quantisation}|{fingerprint}|{vocab_size}|{_versions()}".encode()).hexdigest()[:16]


def export_onnx_int8(model, out_dir: "str | os.PathLike", *, mlp_output_fp32: bool = True) -> Path:
    """Export ``model`` (a base model returning last_hidden_state) and quantise it into ``out_dir``.

    ``mlp_output_fp32=False`` quantises every matrix product, the MLP's output ones too (what
    ``benchmarks/int8_choice.py`` compares; the runtime always keeps them fp32).

    Written into a temporary directory beside ``out_dir`` and moved into place at the end, so an
    interrupted export leaves nothing half-written; returns the path of the int8 model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path(out_dir)
    # another process that won the race to build the same cache entry keeps its copy
    with atomic_dir(out_dir, keep_existing=True) as tmp:
        params = list(model.parameters())
        external = sum(p.numel() for p in params) * 4 > _EXTERNAL_DATA_BYTES
        wrapped = LastHidden(model).eval()
        fp32_model = next(iter(params)).dtype
        if fp32_model != torch.float32:
            raise ValueError(f"export needs fp32 weights, the model is {fp32_model}")
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 0, 0, 0]])
        mask = (ids != 0).long()
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
        log.info("exporting the encoder to ONNX and quantising it to int8 (once) into %s", out_dir)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on the HF code; tests check the graph
            program = torch.onnx.export(
                wrapped, (ids, mask), dynamo=True, verbose=False, optimize=True, opset_version=OPSET,
                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
        program.save(str(tmp / "fp32.onnx"), external_data=external)
        # Matrix products only: the embedding table stays fp32 (a lookup gains no speed from int8).
        quantize_dynamic(tmp / "fp32.onnx", tmp / MODEL_FILE, weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=int8_reduce_range(), op_types_to_quantize=["MatMul"],
                         use_external_data_format=external,
                         nodes_to_exclude=_mlp_output_products(tmp / "fp32.onnx", model.config.intermediate_size)
                         if mlp_output_fp32 else [])
        for f in tmp.glob("fp32.onnx*"):
            f.unlink()
    return out_dir / MODEL_FILE


def _mlp_output_products(path: Path, intermediate_size: int) -> list[str]:
    """MatMul nodes that multiply the MLP's intermediate activations (weight rows = intermediate_size).

    Their input holds the few very large activations LLMs are known for; one int8 scale per batch
    for such a tensor rounds every other value away, so these products stay fp32 (~25% of the
    FLOPs of a LLaMA-style layer). Found by shape, not by module name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    rows = {i.name: i.dims[0] for i in graph.initializer if len(i.dims) == 2}
    return [n.name for n in graph.node if n.op_type == "MatMul" and rows.get(n.input[1]) == intermediate_size]


class OnnxInt8Forward:
    """Callable (input_ids, attention_mask) -> last_hidden_state (fp32), over an ONNX Runtime session."""

    name = "onnx-int8"

    def __init__(self, path: "str | os.PathLike", vocab_size: int, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: between requests a server shares its cores with
        # the event loop that parses them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"input_ids": input_ids.cpu().numpy(),
                                         "attention_mask": attention_mask.cpu().numpy()})
        return torch.from_numpy(out)


def load_runtime(runtime: str, model, fingerprint: str | None, cache: "str | os.PathLike | None" = None):
    """The forward callable for ``runtime`` over ``model`` (a base model), or None for plain torch.

    With a ``fingerprint`` the exported model is cached under ``cache`` (default
    ``$LLARA_CACHE/runtimes``); without one (a model built in memory) it is exported to a temporary
    directory for this process only."""
    if _check(runtime) == "torch":
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError("--runtime onnx-int8 needs ONNX Runtime: pip install 'llara[int8]'") from None
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("the onnx-int8 runtime runs on the CPU; load the model with device='cpu'")
    vocab = model.get_input_embeddings().weight.shape[0]
    if fingerprint is None:  # nothing identifies the weights: export for this process only
        tmp = Path(tempfile.mkdtemp(prefix="llara-onnx-int8-"))
        try:
            return OnnxInt8Forward(export_onnx_int8(model, tmp / "model"), vocab)  # the session holds the model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(cache or cache_root() / "runtimes") / f"onnx-int8-{runtime_key(fingerprint, vocab)}"
    path = out / MODEL_FILE
    if not path.is_file():
        path = export_onnx_int8(model, out)
    else:
        log.info("int8 encoder from cache %s", out)
    return OnnxInt8Forward(path, vocab)
