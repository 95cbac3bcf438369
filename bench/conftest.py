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
from typing import NamedTuple

import pytest
import torch

from gpu_ann import synthetic
from gpu_ann.backend import get_backend
from gpu_ann.data.readers import load_bundled_anime

PATHS = ("dense", "sparse")
SOFTMAXES = ("full", "sampled")
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adam", "lazy-adam")
BASELINE = "dense+full"  # the training-step variant every other one is compared with (fp32, eager)

# Sizes of the synthetic matrices. "small" keeps the CPU run to a couple of minutes while keeping the
# catalogue at MyAnimeList-2020 width (17.5k items), where the GPU targets are set.
SIZES = {
    "tiny": (3_000, 5_000, 150_000),  # the GPU check's rehearsal on the CPU (bench/gpu_check.py --rehearse)
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
        help="fp32,bf16 (autocast) for the training step; default fp32 on the CPU (with no bf16 matmul units, "
        "bf16 autocast there took 3-44 s a step on 2 cores), both on the GPU",
    )
    g.addoption("--train-paths", default="dense,sparse", help="input paths for the training step: dense,sparse")
    g.addoption("--train-softmax", default="full,sampled", help="training-step losses: full,sampled")
    g.addoption("--train-negatives", type=int, default=1024, help="negatives per batch of the sampled softmax")
    g.addoption(
        "--train-optimizers",
        default="adam,lazy-adam",
        help="optimisers for the training step: adam,lazy-adam (lazy-adam only for the variants with the sparse "
        "path or the sampled softmax, eager)",
    )
    g.addoption(
        "--train-compiled",
        default=None,
        help="PATH+SOFTMAX+DTYPE,... also run compiled (torch.compile), at the largest --train-items and "
        "--train-batch-sizes only; 'none' for none; default dense+full+fp32,sparse+sampled+fp32 on the CPU, "
        "the same in bf16 on the GPU (those of --train-paths and --train-softmax)",
    )
    g.addoption(
        "--lazy-items", type=int, default=1_000_000, help="rows of each item table in the lazy optimiser-step benchmark"
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

    def target(m: Measurement, what: str, ratio: float, goal: float | None = None) -> None:
        targets.append(dict(method=m.method, dtype=m.dtype, batch=m.batch, what=what, ratio=ratio, goal=goal))

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
                target(m, what, _ratio(m.rows_per_s, b.rows_per_s), goal)
        for base, goal, what in (
            ("parallel-memset", 0.7, "bytes/s vs parallel memset of the same buffer"),
            ("device-copy", 0.8, "bytes/s vs device-to-device copy (read + write)"),
        ):
            b = by.get(("ceiling", base, batch, dtype))
            if b:
                target(m, what, _ratio(m.gb_per_s, b.gb_per_s), goal)
    # Training steps come in several catalogue sizes: their baselines are keyed by size too.
    steps = {(m.method, m.batch, m.n_items, m.dtype): m for m in results if m.suite == "train-step"}
    for m in results:
        if m.suite != "train-step":
            continue
        device, _, variant = m.method.partition(" ")  # "step-cuda", "sparse+sampled-1024 compiled"
        on_gpu = device.endswith("cuda")
        base = steps.get((f"{device} {BASELINE}", m.batch, m.n_items, "fp32"))
        if base is not None:
            what = f"samples/s vs {BASELINE} fp32 eager, same run (n={m.n_items})"
            target(m, what, _ratio(m.rows_per_s, base.rows_per_s))
        # Compiled, or with lazy Adam: against the same variant eager with Adam, same dtype and size.
        plain = m.method.replace(" compiled", "").replace(" lazy-adam", "")
        same = steps.get((plain, m.batch, m.n_items, m.dtype))
        if plain != m.method and same is not None:
            what = f"samples/s vs the same variant eager with Adam (n={m.n_items})"
            target(m, what, _ratio(m.rows_per_s, same.rows_per_s))
        if "assembly_fraction" in m.extra:
            # The 5% goal is the dense design's: a sparse step is so much cheaper that its share is larger.
            goal = 0.05 if m.dtype == "bf16" and on_gpu and variant == BASELINE else None
            target(m, f"assembly share of the step (n={m.n_items})", m.extra["assembly_fraction"], goal)
        goal = 10_000.0 if on_gpu else None
        target(m, f"samples/s vs the notebook's 300 rows/s (n={m.n_items})", m.rows_per_s / 300.0, goal)
    lazy = {m.method: m for m in results if m.suite == "optimizer-step"}
    if "row-adam" in lazy and "torch-sparse-adam" in lazy:
        m, base = lazy["row-adam"], lazy["torch-sparse-adam"]
        target(m, f"steps/s vs torch.optim.SparseAdam, same gradients (n={m.n_items})", _ratio(base.seconds, m.seconds))
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


class TrainCase(NamedTuple):
    """One training-step variant at one size."""

    n_items: int
    batch: int
    path: str  # dense | sparse
    softmax: str  # full | sampled
    dtype: str  # fp32 | bf16
    compiled: bool
    optimizer: str = "adam"  # adam | lazy-adam

    @property
    def id(self) -> str:
        return (
            f"n{self.n_items}-B{self.batch}-{self.path}-{self.softmax}-{self.dtype}-"
            + ("compiled" if self.compiled else "eager")
            + ("-lazy-adam" if self.optimizer == "lazy-adam" else "")
        )


def _choices(option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [x for x in value.split(",") if x]
    if not chosen or not set(chosen) <= set(allowed):
        raise pytest.UsageError(f"{option} {value!r}: expected a comma-separated subset of {allowed}")
    return chosen


def train_cases(config) -> list[TrainCase]:
    """Every eager variant at every size asked for, then the compiled ones at the largest size only.

    Compiling takes tens of seconds per variant, so the compiled variants run once, where the step is
    largest and compiling has the most to gain.
    """
    on_gpu = get_backend(config.getoption("--backend")).name == "cuda"
    option = config.getoption
    dtypes = _choices("--train-dtypes", option("--train-dtypes") or ("fp32,bf16" if on_gpu else "fp32"), DTYPES)
    paths = _choices("--train-paths", option("--train-paths"), PATHS)
    softmaxes = _choices("--train-softmax", option("--train-softmax"), SOFTMAXES)
    sizes = [(n, b) for n in ints(option("--train-items")) for b in ints(option("--train-batch-sizes"))]
    cases = [TrainCase(n, b, p, s, d, False) for n, b in sizes for p in paths for s in softmaxes for d in dtypes]
    if "lazy-adam" in _choices("--train-optimizers", option("--train-optimizers"), OPTIMIZERS):
        # Where a step has sparse gradients to be lazy with: not dense + full (torch.compile cannot trace them).
        cases += [c._replace(optimizer="lazy-adam") for c in cases if c.path == "sparse" or c.softmax == "sampled"]
    compiled = option("--train-compiled")
    if compiled is None:  # the two ends, among the paths and losses asked for
        precision = "bf16" if on_gpu else "fp32"
        ends = [
            f"{p}+{s}+{precision}"
            for p, s in (("dense", "full"), ("sparse", "sampled"))
            if p in paths and s in softmaxes
        ]
        compiled = ",".join(ends)
    if compiled != "none" and sizes:
        largest = (max(n for n, _ in sizes), max(b for _, b in sizes))
        for spec in (x for x in compiled.split(",") if x):
            parts = spec.split("+")
            if len(parts) != 3 or parts[0] not in PATHS or parts[1] not in SOFTMAXES or parts[2] not in DTYPES:
                raise pytest.UsageError(
                    f"--train-compiled entry {spec!r}: expected PATH+SOFTMAX+DTYPE, e.g. sparse+sampled+bf16"
                )
            cases.append(TrainCase(*largest, *parts, True))
    return cases


def pytest_generate_tests(metafunc):
    """Batch sizes, catalogue sizes and training-step variants come from the command line."""
    if "batch_size" in metafunc.fixturenames:
        metafunc.parametrize("batch_size", ints(metafunc.config.getoption("--batch-sizes")))
    if "train_case" in metafunc.fixturenames:
        cases = train_cases(metafunc.config)
        metafunc.parametrize("train_case", cases, ids=[c.id for c in cases])
