"""The benchmark suites and the large-catalogue command run end to end at tiny sizes, so the documented
commands cannot rot unseen."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_ann.planner import format_bytes

ROOT = Path(__file__).resolve().parents[1]
HAS_C_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None


def run(args, tmp_path, timeout=600):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_bench_suites_run_and_report_every_ratio(tmp_path):
    # fmt: off
    run(["-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--backend", "cpu", "--scale", "bundled",
         "--batch-sizes", "64", "--train-items", "400", "--train-batch-sizes", "32", "--train-dtypes", "fp32,bf16",
         "--train-negatives", "64", "--train-compiled", "sparse+sampled+fp32", "--lazy-items", "5000",
         "--results", str(tmp_path)], tmp_path)
    # fmt: on
    results = json.loads((tmp_path / "results.json").read_text())
    measured = results["measurements"]
    methods = {(m["suite"], m["method"], m["dtype"]) for m in measured}
    for expected in [
        ("assembly", "gpu-ann-cpu", "fp32"),
        ("assembly", "gpu-ann-cpu", "bf16"),
        ("assembly", "scipy", "fp32"),
        ("assembly", "notebook", "fp32"),
        ("assembly", "torch-sparse", "fp32"),
        ("ceiling", "parallel-memset", "fp32"),
        ("optimizer-step", "torch-sparse-adam", "fp32"),
        ("optimizer-step", "row-adam", "fp32"),
    ]:
        assert expected in methods
    # Every path x softmax x precision, eager, and the compiled variant where torch.compile can build.
    steps = {(m["method"], m["dtype"]): m for m in measured if m["suite"] == "train-step"}
    expected_steps = {
        (f"step-cpu {path}+{softmax}", dtype)
        for path in ("dense", "sparse")
        for softmax in ("full", "sampled-64")
        for dtype in ("fp32", "bf16")
    }
    # ... and with lazy Adam wherever a step has a sparse gradient (all but dense + full).
    expected_steps |= {(f"{method} lazy-adam", dtype) for method, dtype in expected_steps if "dense+full" not in method}
    if HAS_C_COMPILER:
        expected_steps.add(("step-cpu sparse+sampled-64 compiled", "fp32"))
    assert set(steps) == expected_steps

    # The counted FLOPs of the baseline, by hand for n = 400, B = 32 and the default hidden (256, 512, 256):
    # first layer forward + weight gradient, middle layers and output layer forward + both gradients.
    n, b, (h0, h1, h2) = 400, 32, (256, 512, 256)
    base = steps[("step-cpu dense+full", "fp32")]
    flops = 2 * b * (2 * (n + 3) * h0 + 3 * (h0 * h1 + h1 * h2) + 3 * h2 * n)
    assert base["extra"]["tflops"] * 1e12 * base["seconds"] == pytest.approx(flops, rel=1e-9)
    sampled = steps[("step-cpu dense+sampled-64", "fp32")]
    flops = 2 * b * (2 * (n + 3) * h0 + 3 * (h0 * h1 + h1 * h2) + 3 * h2 * 65)
    assert sampled["extra"]["tflops"] * 1e12 * sampled["seconds"] == pytest.approx(flops, rel=1e-9)

    # Each variant's ratio to dense+full fp32 eager is its samples/s over the baseline's, from the raw medians.
    ratios = {
        (t["method"], t["dtype"]): t["ratio"] for t in results["targets"] if t["what"].startswith("samples/s vs dense")
    }
    assert set(ratios) == expected_steps
    for key, m in steps.items():
        assert ratios[key] == pytest.approx(base["seconds"] / m["seconds"], rel=1e-9)
    assert ratios[("step-cpu dense+full", "fp32")] == 1.0
    # Compiled and lazy-Adam variants also against the same variant eager with Adam, same dtype.
    same = {
        (t["method"], t["dtype"]): t["ratio"]
        for t in results["targets"]
        if t["what"].startswith("samples/s vs the same variant eager with Adam")
    }
    assert set(same) == {k for k in expected_steps if k[0].endswith((" compiled", " lazy-adam"))}
    for (method, dtype), ratio in same.items():
        plain = steps[(method.removesuffix(" compiled").removesuffix(" lazy-adam"), dtype)]
        assert ratio == pytest.approx(plain["seconds"] / steps[(method, dtype)]["seconds"], rel=1e-9)

    whats = {t["what"] for t in results["targets"]}
    assert "steps/s vs torch.optim.SparseAdam, same gradients (n=5000)" in whats
    assert "rows/s vs scipy slice + toarray" in whats and "bytes/s vs parallel memset of the same buffer" in whats
    assert all(t["ratio"] > 0 for t in results["targets"])
    assert "| target |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_large_catalogue_quick_trains_sparse_sampled_and_records_the_planner(tmp_path):
    out = tmp_path / "run"
    done = run(["bench/large_catalogue.py", "--quick", "--backend", "cpu", "--dense-steps", "1", "--out", str(out)],
               tmp_path)  # fmt: skip
    record = json.loads((out / "large_catalogue.json").read_text())
    assert record["data"]["items"] == 20_000 and record["data"]["users"] == 400
    assert record["settings"]["quick"] and record["settings"]["batch_size"] == 32
    train = record["train"]
    assert train["steps"] == 4
    assert [h["step"] for h in train["history"]] == [2, 4]  # evaluations every half of --steps
    assert train["samples_per_second"] == pytest.approx(4 * 32 / train["seconds"])
    assert math.isfinite(train["final_validation_loss"])
    # The script's estimate for its own run is the one train() computed and logged for the same settings.
    logged = re.search(r"estimated memory (.+?) of ", done.stderr).group(1)
    plans = record["planner"]["by_batch"]
    assert [p["batch"] for p in plans] == [32, 128, 512]
    assert format_bytes(plans[0]["sparse+sampled"]["total_bytes"]) == logged
    for p in plans:
        # Dense rows and all-item logits grow with B x n: always the larger design at 20,000 items.
        assert p["dense+full"]["total_bytes"] > p["sparse+sampled"]["total_bytes"]
        assert p["dense+full"]["refused"] is None  # a few MiB: nothing is refused at this size
    assert record["dense_design_seconds_per_step"] > 0
    assert "samples/s over the whole run" in done.stdout
    # The same command again: the new run replaces the earlier one, whose record the script removes first.
    (out / "large_catalogue.json").write_text("{}")
    run(["bench/large_catalogue.py", "--quick", "--backend", "cpu", "--out", str(out)], tmp_path)
    assert json.loads((out / "large_catalogue.json").read_text())["train"]["steps"] == 4
