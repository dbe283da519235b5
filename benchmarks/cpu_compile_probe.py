"""Would ``torch.compile`` speed up LoRA fine-tuning on a CPU? One forward + backward of 16 passages of 96
tokens (``llara recipe``'s passage side) through the embedded model with LoRA r64 on all seven
projections, dropout 0.1, fp32 (``--precision bf16``: under bf16 autocast, the eager mode with the
attention ``training_kernels`` picks, as the training loop runs it):

* ``eager``: llara's own LoRA (``apply_lora``: adapters fused into their projection, 1-byte dropout masks);
* ``compiled``: peft's stock LoRA layers, each decoder layer compiled by inductor (regional compilation,
  ``layer.compile()``), so that inductor can fuse the dropout, the adapters' sums and the elementwise
  ops (llara's own layers used in-place autograd functions and, when this probe ran, a thread pool for
  their masks: dynamo cannot trace them).

    python benchmarks/cpu_compile_probe.py --out /tmp/compile_probe.json
    python benchmarks/cpu_compile_probe.py --precision bf16 --out /tmp/compile_probe_bf16.json

Each mode runs in its own process; seconds per step are the median of the steps after the first (which
compiles). Results: ``benchmarks/results/cpu_train_fp32.md`` ("Tried, not kept").
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_mode(mode: str, steps: int, precision: str = "fp32") -> list[float]:
    import contextlib

    import torch

    from llara.modeling.precision import training_kernels

    from llara.modeling.host_memory import keep_freed_memory
    from llara.modeling.loading import load_model
    from llara.training.lora import apply_lora, find_projection_names

    keep_freed_memory()
    torch.manual_seed(0)
    model = load_model("default", dtype="float32")[0]
    if mode == "eager":
        peft_model = apply_lora(model, r=64, alpha=16, dropout=0.1)
    else:
        import torch._dynamo
        from peft import LoraConfig, get_peft_model

        torch._dynamo.config.cache_size_limit = 64  # one graph per decoder layer (each has its own layer_idx)
        peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1,
                                                      target_modules=find_projection_names(model)))
        for layer in peft_model.get_base_model().layers:
            layer.compile(dynamic=False)
    peft_model.train()
    ids = torch.randint(100, 40000, (16, 96))
    seconds = []
    bf16 = precision == "bf16"
    for _ in range(steps):
        t = time.perf_counter()
        with (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()), \
                (training_kernels("bf16", on_cpu=True) if bf16 and mode == "eager" else contextlib.nullcontext()):
            hidden = peft_model.get_base_model()(input_ids=ids, use_cache=False).last_hidden_state
            loss = hidden[:, -8:].float().mean()
        loss.backward()
        seconds.append(round(time.perf_counter() - t, 3))
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single mode, in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_mode(args.one, args.steps, args.precision)))
        return 0
    result = {"command": "python benchmarks/cpu_compile_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "shape": f"16 x 96 tokens, forward + backward, LoRA r64 all projections, dropout 0.1, {args.precision}"
              + (" (autocast)" if args.precision == "bf16" else ""), "modes": {}}
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
                               "--precision", args.precision],
                              capture_output=True, text=True, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        result["modes"][mode] = {"seconds_by_step": seconds, "median_after_first": statistics.median(seconds[1:])}
        print(mode, result["modes"][mode], flush=True)
    if args.out:
        from llara.io import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
