"""benchmarks/encode_ratio.py's ``measure`` on CPU with a tiny model: both paths run the same batches."""
from __future__ import annotations

from bench_scripts import load_benchmark
from tiny import make_model, make_tokenizer


def test_measure_times_encode_and_the_raw_forward_over_the_same_batches(tmp_path):
    module = load_benchmark("encode_ratio")
    make_tokenizer().save_pretrained(tmp_path / "tok")  # a directory, as gpu_check.py passes it
    texts = [" ".join(["the dense retrieval model"] * (1 + i % 7)) for i in range(30)]
    row = module.measure(make_model(), str(tmp_path / "tok"), texts, "cpu", None, batch_size=None, max_length=48,
                         max_batch_tokens=128, repeats=2)
    assert row["texts"] == 30 and row["batches"] == len(row["batch_shapes"]) > 1
    assert all(rows * width <= 128 for rows, width in row["batch_shapes"])
    assert row["padded_tokens"] == sum(r * w for r, w in row["batch_shapes"]) > row["tokens"]
    assert len(row["raw_seconds"]) == len(row["encode_seconds"]) == 2
    assert row["ratio"] > 0 and row["raw_tokens_per_s"] > 0 and row["dtype"] == "float32"
