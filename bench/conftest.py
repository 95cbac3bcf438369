"""Shared set-up of the benchmark suites: options, synthetic data, and the results table.

Every benchmark records what it measured with :func:`record`; at the end of the run the table of
rows/s, bytes/s and the ratios against the baselines measured in the same run is printed and, with
``--results DIR``, written there as ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import pytest
import torch

from gpu_ann import synthetic
from gpu_ann.backend import get_backend
from gpu_ann.data.readers import load_bundled_anime

# Sizes of the synthetic matrices. "small" keeps the CPU run to a couple of minutes while keeping the
# catalogue at MyAnimeList-2020 width (17.5k items), where the GPU targets are set.
SIZES = {
    "small": (20_000, 17_500, 3_500_000),
    **synthetic.SCALES,
}


def pytest_addoption(parser):
    g = parser.getgroup("gpu-ann benchmarks")
    g.addoption("--backend", default="auto", choices=("auto", "cpu", "cuda"), help="backend to measure")
    g.addoption("--scale", default="small", choices=sorted(SIZES), help="synthetic data size for assembly")
    g.addoption("--batch-sizes", default="256,1024,4096", help="comma-separated batch sizes for assembly")
    g.addoption("--train-items", default="17500", help="comma-separated catalogue sizes for the training step")
    g.addoption("--train-batch-sizes", default="1024", help="comma-separated batch sizes for the training step")
    g.addoption(
        "--train-dtypes",
        default=None,
        help="fp32,bf16 (autocast) for the training step; default fp32 on the CPU (bf16 autocast there "
        "took 19 s a step on 2 cores), both on the GPU",
    )
    g.addoption("--results", default=None, help="directory for results.json and results.md")


@dataclass
class Measurement:
    suite: str  # "assembly" | "train-step" | "ceiling"
    method: str
    batch: int
    n_items: int
    dtype: str
    seconds: float  # median of the rounds
    bytes_written: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9


RESULTS: list[Measurement] = []


def record(benchmark, suite, method, batch, n_items, dtype, bytes_written=0, calls=1, **extra) -> Measurement:
    """Store one benchmark's median; ``calls`` = how many batches one timed round built."""
    m = Measurement(suite, method, batch, n_items, dtype, benchmark.stats.stats.median / calls, bytes_written, extra)
    RESULTS.append(m)
    return m


@pytest.fixture(scope="session")
def backend(request):
    return get_backend(request.config.getoption("--backend"))


@cache
def _profile():
    return synthetic.fit(load_bundled_anime())


@cache
def synthetic_matrix(n_users: int, n_items: int, nnz: int):
    """A seeded synthetic matrix shaped like the bundled anime data (made once per size and run)."""
    started = time.perf_counter()
    csr = synthetic.generate(_profile(), n_users, n_items, nnz, seed=0)
    print(
        f"\nsynthetic {csr.shape[0]:,} x {csr.shape[1]:,}, {csr.nnz:,} interactions "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return csr


@pytest.fixture(scope="session")
def bench_matrix(request):
    return synthetic_matrix(*SIZES[request.config.getoption("--scale")])


def sync(backend):
    """Wait for the device (timing only): a host-device sync."""
    backend.synchronize()


def _ratio(num, den):
    return num / den if num and den else float("nan")


def summarise(results: list[Measurement]) -> tuple[list[str], list[dict]]:
    """Lines of the results table and the target ratios, from one run's measurements."""
    lines = [
        "| suite | method | batch | items | dtype | ms | rows/s | GB/s written | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        notes = ", ".join(f"{k} {v:.3g}" for k, v in m.extra.items())
        lines.append(
            f"| {m.suite} | {m.method} | {m.batch} | {m.n_items} | {m.dtype} | {m.seconds * 1e3:.3f} "
            f"| {m.rows_per_s:,.0f} | {m.gb_per_s:.2f} | {notes} |"
        )
    by = {(m.suite, m.method, m.batch, m.dtype): m for m in results}
    targets = []
    for (suite, method, batch, dtype), m in by.items():
        if suite != "assembly" or not method.startswith("gpu-ann"):
            continue
        for base, goal, what in (
            ("scipy", 8.0, "rows/s vs scipy slice + toarray"),
            ("cupyx", 20.0, "rows/s vs cupyx slice + toarray"),
            ("torch-sparse", None, "rows/s vs torch.sparse"),
            ("notebook", None, "rows/s vs the per-row notebook loop"),
        ):
            b = by.get(("assembly", base, batch, "fp32"))
            if b:
                targets.append(
                    dict(
                        method=method,
                        dtype=dtype,
                        batch=batch,
                        what=what,
                        ratio=_ratio(m.rows_per_s, b.rows_per_s),
                        goal=goal,
                    )
                )
        for base, goal, what in (
            ("parallel-memset", 0.7, "bytes/s vs parallel memset of the same buffer"),
            ("device-copy", 0.8, "bytes/s vs device-to-device copy (read + write)"),
        ):
            b = by.get(("ceiling", base, batch, dtype))
            if b:
                targets.append(
                    dict(
                        method=method,
                        dtype=dtype,
                        batch=batch,
                        what=what,
                        ratio=_ratio(m.gb_per_s, b.gb_per_s),
                        goal=goal,
                    )
                )
    for m in results:
        if m.suite == "train-step" and "assembly_fraction" in m.extra:
            targets.append(
                dict(
                    method=m.method,
                    dtype=m.dtype,
                    batch=m.batch,
                    what=f"assembly share of the step (n={m.n_items})",
                    ratio=m.extra["assembly_fraction"],
                    goal=0.05 if m.dtype == "bf16" and m.method.endswith("cuda") else None,
                )
            )
            targets.append(
                dict(
                    method=m.method,
                    dtype=m.dtype,
                    batch=m.batch,
                    what=f"samples/s vs the notebook's 300 rows/s (n={m.n_items})",
                    ratio=m.rows_per_s / 300.0,
                    goal=10_000.0 if m.method.endswith("cuda") else None,
                )
            )
    lines += ["", "| target | method | dtype | batch | measured ratio | goal |", "|---|---|---|---|---|---|"]
    for t in targets:
        goal = "" if t["goal"] is None else (f"≤ {t['goal']:g}" if "share" in t["what"] else f"≥ {t['goal']:g}")
        lines.append(f"| {t['what']} | {t['method']} | {t['dtype']} | {t['batch']} | {t['ratio']:.3g} | {goal} |")
    return lines, targets


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    lines, targets = summarise(RESULTS)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    header = (
        f"gpu-ann benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    terminalreporter.write_sep("=", "gpu-ann results")
    terminalreporter.write_line(header)
    for line in lines:
        terminalreporter.write_line(line)
    out = config.getoption("--results")
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
        payload = {"header": header, "measurements": [asdict(m) for m in RESULTS], "targets": targets}
        (out / "results.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def pytest_generate_tests(metafunc):
    """Batch sizes and catalogue sizes come from the command line."""
    for name, option in (
        ("batch_size", "--batch-sizes"),
        ("train_items", "--train-items"),
        ("train_batch", "--train-batch-sizes"),
    ):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, ints(metafunc.config.getoption(option)))
    if "train_dtype" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--train-dtypes")
        if chosen is None:
            chosen = "fp32,bf16" if get_backend(metafunc.config.getoption("--backend")).name == "cuda" else "fp32"
        metafunc.parametrize("train_dtype", chosen.split(","))
