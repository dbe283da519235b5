"""``Encoder.encode`` against the raw base-model forward over the same padded batches (issue 20).

The limit is ``base_model(model)(input_ids=..., attention_mask=...)`` over the very batches
``Encoder.encode`` runs (``Encoder.batches``: same tokens, same shapes, same order), tokenised,
padded and copied to the device up front and not timed. ``Encoder.encode`` is timed whole:
tokenising, sorting, batching, copies, forward, pooling, normalising and the embeddings on the
host. Both are warmed up, then run interleaved ``repeats`` times (best and median of each), with a
device synchronisation before every clock read. Tokens/s count the padded tokens of those batches
(the same number for both paths), so the ratio is raw seconds / encode seconds.

``measure`` is the reusable part (``benchmarks/gpu_check.py`` calls it on a GPU)::

    sys.path.insert(0, str(benchmarks_dir)); from encode_ratio import measure
    row = measure(model, tokenizer_dir, texts, "cuda", torch.bfloat16, batch_size=128, max_length=256)

On this CPU, with the embedded model (the first load converts the GGUF, ~25 s)::

    .venv/bin/python benchmarks/encode_ratio.py --model default --texts 256 --batch-size 32 \\
        --out benchmarks/results/encode_ratio.json

Writes the JSON given by ``--out`` and a Markdown summary next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "llara" / "data" / "demo" / "med" / "corpus.jsonl"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, tokenizer, texts, device, dtype=None, batch_size: int | None = 128, max_length: int = 256,
            max_batch_tokens: int | None = None, repeats: int = 3, template: str = "llara",
            warmup_batches: int = 2) -> dict:
    """Time ``Encoder.encode(texts, "passage")`` and the raw forward over the same padded batches.

    ``model``: a Hugging Face model (with or without LM head; moved to ``device`` / ``dtype``, None
    keeps its dtype); ``tokenizer``: a tokenizer or a directory holding one. The model may grow by
    the template's slot tokens (as ``Encoder`` does). Returns tokens/s of both, their ratio (best of
    ``repeats`` each, and of the medians), and the batches' shapes."""
    from llara.modeling.embed import base_model
    from llara.modeling.encoder import Encoder

    device = torch.device(device)
    if isinstance(tokenizer, (str, os.PathLike)):
        from llara.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
    limits = {"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}
    enc = Encoder(model, tokenizer, template, batch_size=batch_size, max_passage_length=max_length,
                  show_progress=False, **limits)
    texts = list(texts)
    batches = [b for _, b in enc.batches(texts, "passage")]  # the very batches encode runs, in its order
    on_device = [(b.input_ids.to(device), b.attention_mask.to(device)) for b in batches]
    padded = sum(b.input_ids.numel() for b in batches)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    body = base_model(enc.model)

    @torch.inference_mode()
    def raw(pairs) -> float:
        _sync(device)
        t = time.perf_counter()
        for ids, mask in pairs:
            body(input_ids=ids, attention_mask=mask)
        _sync(device)
        return time.perf_counter() - t

    def encode(subset) -> float:
        _sync(device)
        t = time.perf_counter()
        enc.encode(subset, "passage")
        _sync(device)
        return time.perf_counter() - t

    first = sum(b.input_ids.size(0) for b in batches[:warmup_batches])
    raw(on_device[:warmup_batches])  # warm-up: kernels, allocator, the longest shapes first
    encode(texts[:first])
    raw_s, enc_s = [], []
    for _ in range(repeats):  # interleaved: other load on the machine hits both alike
        raw_s.append(raw(on_device))
        enc_s.append(encode(texts))
    st = enc.last_stats
    if st.padded_tokens != padded:
        raise RuntimeError(f"encode ran {st.padded_tokens} padded tokens, the raw batches hold {padded}")
    return {
        "texts": len(texts), "batches": len(batches), "tokens": real, "padded_tokens": padded,
        "padding_fraction": round(1 - real / padded, 4),
        "batch_shapes": [list(b.input_ids.shape) for b in batches],
        "batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "max_length": max_length,
        "dtype": str(next(enc.model.parameters()).dtype).replace("torch.", ""), "device": str(device),
        "repeats": repeats, "raw_seconds": [round(x, 4) for x in raw_s], "encode_seconds": [round(x, 4) for x in enc_s],
        "raw_tokens_per_s": round(padded / min(raw_s), 1), "encode_tokens_per_s": round(padded / min(enc_s), 1),
        "encode_real_tokens_per_s": round(real / min(enc_s), 1),
        "ratio": round(min(raw_s) / min(enc_s), 4),
        "ratio_median": round(statistics.median(raw_s) / statistics.median(enc_s), 4),
        # the last encode call: seconds in the model, and the rest (tokenising, batching, copies, waits)
        "encode_model_seconds": round(st.model_seconds, 4),
        "encode_outside_model_seconds": round(enc_s[-1] - st.model_seconds, 4),
    }


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="as `llara --model` (default: %(default)s)")
    ap.add_argument("--texts", type=int, default=256, help="passages of the demo corpus (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", help="auto: llara's choice for the device (default: %(default)s)")
    ap.add_argument("--label", default=None, help="a note stored with the result (e.g. before/after)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON (a .md summary is written beside it)")
    args = ap.parse_args(argv)

    from llara.io import iter_jsonl, passage_text
    from llara.modeling.loading import load_model

    info = _machine()  # the commit now, not after a run in which the checkout may move
    texts = [passage_text(doc) for _, doc in iter_jsonl(DEMO)][: args.texts]
    t = time.perf_counter()
    model, tok, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t
    device = next(model.parameters()).device
    row = measure(model, tok, texts, device, None, args.batch_size, args.max_length, args.max_batch_tokens,
                  args.repeats)
    row.update(model=args.model, load_seconds=round(load_s, 1), label=args.label, machine=info,
               command="python benchmarks/encode_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    md = (f"# Encode vs raw forward ({row['label'] or args.out.stem})\n\n"
          f"{row['texts']} demo passages, {row['batches']} batches (batch size {row['batch_size']}, max batch tokens "
          f"{row['max_batch_tokens']}, max length {row['max_length']}), {row['dtype']} on {row['device']}, "
          f"padding {100 * row['padding_fraction']:.1f}%, commit {row['machine'].get('commit')}.\n\n"
          "| path | padded tokens/s (best of {r}) | seconds (all runs) |\n|---|---|---|\n"
          f"| raw base-model forward, batches prebuilt on the device | {row['raw_tokens_per_s']:.0f} | "
          f"{', '.join(map(str, row['raw_seconds']))} |\n"
          f"| `Encoder.encode` | {row['encode_tokens_per_s']:.0f} | {', '.join(map(str, row['encode_seconds']))} |\n\n"
          f"Ratio encode / raw: **{row['ratio']:.3f}** (best of each), {row['ratio_median']:.3f} (medians). "
          f"The last encode call spent {row['encode_model_seconds']:.2f} s in the model and "
          f"{row['encode_outside_model_seconds']:.2f} s outside it.\n\n"
          f"Command: `{row['command']}`\n").replace("{r}", str(row["repeats"]))
    args.out.with_suffix(".md").write_text(md)
    print(json.dumps({k: row[k] for k in ("raw_tokens_per_s", "encode_tokens_per_s", "ratio", "ratio_median")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
