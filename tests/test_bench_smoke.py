"""The benchmark suites run end to end at tiny sizes, so the documented command cannot rot unseen."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_suites_run_and_report_every_ratio(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench",
            "-q",
            "-p",
            "no:cacheprovider",
            "--backend",
            "cpu",
            "--scale",
            "bundled",
            "--batch-sizes",
            "64",
            "--train-items",
            "400",
            "--train-batch-sizes",
            "32",
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {(m["suite"], m["method"], m["dtype"]) for m in results["measurements"]}
    for expected in [
        ("assembly", "gpu-ann-cpu", "fp32"),
        ("assembly", "gpu-ann-cpu", "bf16"),
        ("assembly", "scipy", "fp32"),
        ("assembly", "notebook", "fp32"),
        ("assembly", "torch-sparse", "fp32"),
        ("ceiling", "parallel-memset", "fp32"),
        ("train-step", "step-cpu", "fp32"),
    ]:
        assert expected in methods
    whats = {t["what"] for t in results["targets"]}
    assert "rows/s vs scipy slice + toarray" in whats and "bytes/s vs parallel memset of the same buffer" in whats
    assert all(t["ratio"] > 0 for t in results["targets"])
    assert "| target |" in (tmp_path / "results.md").read_text()
