"""Which runtime for the int8 path: the embedded model's forward pass in torch, ONNX Runtime and OpenVINO.

Reproduce (from the repository root; OpenVINO is not a llara dependency: `pip install openvino` first,
or its rows are skipped; ~5 min on 2 CPU cores):

    flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/int8_choice.py

SmolLM2-135M (embedded) with the `llara` slot tokens, batches of random token ids (all positions
attended) of shapes 32x96 (indexing), 16x40 (a service batch) and 1x40 (one query); best of 3 (10
for one query) after a warm-up, 2 threads everywhere. Each row's `cos` is the mean cosine between
its last hidden states and torch fp32's, over every position: a first look at precision before
nDCG (benchmarks/int8.py). Rows:

* torch fp32 / bf16: the stock forward;
* onnxruntime int8 (llara's `--runtime onnx-int8`): ONNX Runtime dynamic int8, MLP output products fp32;
* onnxruntime int8, all MatMuls: the same with every matrix product int8;
* openvino bf16: the fp32 ONNX graph compiled by OpenVINO with the bf16 precision hint;
* openvino on the int8 graph: the all-MatMuls int8 graph compiled by OpenVINO.

Writes benchmarks/results/int8_choice.{json,md}.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from zero_shot import RESULTS, machine

from llara.modeling import runtime as rt
from llara.modeling.embed import base_model
from llara.modeling.encoder import Encoder

SHAPES = [(32, 96), (16, 40), (1, 40)]


def main() -> None:
    torch.set_num_threads(2)
    enc = Encoder.from_pretrained("default", template="llara", device="cpu", dtype="float32", show_progress=False)
    fp32 = base_model(enc.model)
    bf16 = base_model(Encoder.from_pretrained("default", template="llara", device="cpu", dtype="bfloat16",
                                              show_progress=False).model)
    work = Path(tempfile.mkdtemp(prefix="int8-choice-"))
    try:
        import onnxruntime as ort

        def torch_fn(m):
            def f(i, a):
                with torch.inference_mode():
                    return m(input_ids=i, attention_mask=a).last_hidden_state.float().numpy()
            return f

        def ort_fn(path):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return lambda i, a: s.run(None, {"input_ids": i.numpy(), "attention_mask": a.numpy()})[0]

        fns = {"torch fp32": torch_fn(fp32), "torch bf16": torch_fn(bf16)}
        t = time.perf_counter()
        fns["onnxruntime int8"] = ort_fn(rt.export_onnx_int8(fp32, work / "int8"))
        export_s = time.perf_counter() - t
        all_int8 = rt.export_onnx_int8(fp32, work / "int8-all", mlp_output_fp32=False)  # every MatMul int8
        fns["onnxruntime int8, all MatMuls"] = ort_fn(all_int8)
        try:
            import openvino as ov

            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
            sample = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
            program = torch.onnx.export(rt.LastHidden(fp32).eval(), sample, dynamo=True, verbose=False,
                                        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                                        dynamic_shapes={"input_ids": dims, "attention_mask": dims})
            program.save(str(work / "fp32.onnx"))
            core = ov.Core()
            cfg = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 2}
            for name, path in (("openvino bf16", work / "fp32.onnx"), ("openvino on the int8 graph", all_int8)):
                compiled = core.compile_model(str(path), "CPU", cfg)
                fns[name] = (lambda c: lambda i, a: c({"input_ids": i.numpy(), "attention_mask": a.numpy()})[0])(compiled)
            ov_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        except ImportError:
            ov_version = None
        g = torch.Generator().manual_seed(0)
        rows = []
        for shape in SHAPES:
            ids = torch.randint(100, 40000, shape, generator=g)
            att = torch.ones_like(ids)
            ref = fns["torch fp32"](ids, att)
            for name, f in fns.items():
                f(ids, att)
                best = float("inf")
                for _ in range(3 if shape[0] > 1 else 10):
                    t = time.perf_counter()
                    out = f(ids, att)
                    best = min(best, time.perf_counter() - t)
                cos = float(np.mean(np.sum(out * ref, -1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)))
                rows.append({"runtime": name, "shape": list(shape), "tokens_per_s": round(shape[0] * shape[1] / best, 1),
                             "ms": round(best * 1000, 1), "cos": round(cos, 5)})
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime

    res = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "openvino": ov_version,
           "export_and_quantise_s": round(export_s, 1), "rows": rows,
           "command": "flock /tmp/llara-heavy.lock .venv/bin/python benchmarks/int8_choice.py"}
    (RESULTS / "int8_choice.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Choosing the int8 runtime", "", f"Machine: {res['machine']} (AMD EPYC Zen 4, avx512_vnni / avx512_bf16, "
             f"no AMX; shared with other jobs). onnxruntime {res['onnxruntime']}, openvino {res['openvino']}. "
             f"Command: `{res['command']}`. Random token ids, best of 3 (1x40: of 10); cos = mean cosine of the last "
             "hidden states to torch fp32's. See the script's docstring for each row.", "",
             "| runtime | " + " | ".join(f"{b}x{n} tok/s (cos)" for b, n in SHAPES) + " |",
             "|---|" + "---:|" * len(SHAPES)]
    for name in dict.fromkeys(r["runtime"] for r in rows):
        cells = [next(r for r in rows if r["runtime"] == name and r["shape"] == list(s)) for s in SHAPES]
        lines.append(f"| {name} | " + " | ".join(f"{c['tokens_per_s']:.0f} ({c['cos']:.3f})" for c in cells) + " |")
    (RESULTS / "int8_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
