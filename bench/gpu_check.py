"""The one-call GPU check: every stage in priority order, inside one time budget, results in a few files.

A GPU is lent to this project rarely and briefly (15 minutes of device time per task, the machine's start
and a rerun included; a command may run 10 minutes; at most 8 files come back, no more than two folders
down). So the check is built to that lease:

* stages run most important first (the gpu tests, memcheck, a training epoch, the assembly targets, ...),
  each under its own cap and all under one deadline (``--budget``); a stage that would start with less
  than half its cap left is not started, and the summary prints the ``--only ... --budget ...`` command
  that runs what is left (and what the deadline cut short);
* every stage runs even when an earlier one failed; a stage killed at its cap, or with the check (SIGTERM),
  takes its children with it;
* what comes back is flat: ``summary.txt``, ``results.md``, ``results.json`` and ``logs.tar.gz`` (the
  text each stage wrote: logs, tables, pytest-benchmark's JSON) in ``$OUT``, rewritten after every stage,
  so that a run cut off from outside still returns what it finished;
* each stage's line is printed as it ends; the summary and the table of targets are printed last, where
  the device tool's output tail has them.

``--rehearse`` runs the same stages on the CPU at tiny sizes, then collects each benchmark stage's GPU
command (its exact flags, ``--backend cpu``) with ``--collect-only``, so that a typo in a flag or a broken
stage shows here, in CI, and not in the minutes of a GPU lease (``tests/test_gpu_check.py``).

    bash bench/gpu_check.sh                    # on the GPU machine (the same as python3 bench/gpu_check.py)
    bash bench/gpu_check.sh --only compiled,lazy
    python bench/gpu_check.py --rehearse --out /tmp/rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_STAGE_S = 20  # a stage given less than this, or than half its cap, is not started: it would only be killed
MIN_SHARE = 0.5
RESERVE_S = 10  # kept back from the budget for packing and printing
SETUP_S = 60  # what a rerun's budget adds for the set-up (install, gpu-ann info)
TEXT = {".log", ".json", ".jsonl", ".md", ".txt", ".toml"}  # what logs.tar.gz holds: no checkpoints or arrays
MAX_LOGS_BYTES = 15 * 2**20  # the device tool returns files of up to 16 MiB
REHEARSAL_SLOWER = 4  # caps and budget under --rehearse, against the GPU's
DEFAULT_BUDGET_S = 390  # 6.5 minutes: with a machine's start, a rerun of what is left still fits 15


@dataclass
class Stage:
    name: str
    cap_s: int  # the stage's own time limit (the deadline may cut it shorter)
    argv: list[str]
    keep: str = ""  # regular expression of log lines copied into the summary
    results: bool = False  # a benchmark stage: its results.json / results.md are merged
    skip: str = ""  # a reason not to run it at all


def stages(rehearse: bool, staging: Path) -> list[Stage]:
    """The check's stages, most important first. ``rehearse`` swaps the sizes and the backend, nothing else."""
    backend = "cpu" if rehearse else "cuda"
    scale, batches = ("tiny", "64,256") if rehearse else ("mal2020", "256,1024,4096,8192")
    items, step_batches = ("2000", "64") if rehearse else ("17500,100000", "1024,4096")
    big_items, big_batch = ("2000", "64") if rehearse else ("100000", "4096")
    # bf16 autocast on a CPU without bf16 matmul units takes seconds a step: the rehearsal stays in fp32.
    low, both = ("fp32", "fp32") if rehearse else ("bf16", "fp32,bf16")
    lazy_items = "20000" if rehearse else "1000000"
    bench = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--backend", backend]
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer"))), ""
    )
    large = staging / "large-catalogue"
    plan = [
        Stage(
            "gpu-tests",
            110,
            [PY, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-ra"],
            keep=r"(PASSED|FAILED|ERROR|SKIPPED)",
        ),
        Stage(
            "memcheck",
            60,
            [sanitizer, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "9"]
            + [PY, "bench/sanitizer_workload.py"],
            keep=r"(ERROR SUMMARY|sanitizer workload)",
            skip="rehearsal: no device to check" if rehearse else "" if sanitizer else "compute-sanitizer not found",
        ),
        Stage(
            "train-epoch",
            50,
            [PY, "-m", "gpu_ann", "train", "--backend", backend, "--out", str(staging / "run")]
            + ["--max-epochs", "1"]
            + (["--max-steps", "5"] if rehearse else []),
            keep=r"^(done in|validation loss|popularity)",
        ),
        Stage(
            "assembly",
            70,
            bench + ["bench/test_assembly.py", "--scale", scale, "--batch-sizes", batches],
            results=True,
        ),
        Stage(
            "train-step",
            80,
            bench
            + ["bench/test_train_step.py", "--train-items", items, "--train-batch-sizes", step_batches]
            + ["--train-compiled", "none", "--train-optimizers", "adam", "--train-dtypes", both],
            results=True,
        ),
        Stage(
            "large-catalogue",
            60,
            [PY, "bench/large_catalogue.py", "--backend", backend, "--out", str(large)]
            + (["--quick"] if rehearse else [])
            + ["--batch-size", "32" if rehearse else "4096", "--steps", "4" if rehearse else "200"]
            + ["--dense-steps", "1" if rehearse else "5"],
            keep=r"^(synthetic|memory planner|  batch|  input|trained|validation loss|dense design)",
        ),
        Stage(
            "compiled",
            90,
            bench
            + ["bench/test_train_step.py", "--train-items", big_items, "--train-batch-sizes", big_batch]
            + ["--train-optimizers", "adam", "--train-dtypes", low]
            + ["--train-compiled", f"dense+full+{low},sparse+sampled+{low}"],
            keep=r"^SKIPPED",
            results=True,
        ),
        Stage(
            "lazy",
            45,
            bench
            + ["bench/test_train_step.py", "bench/test_optimizer_step.py"]
            + ["--train-items", big_items, "--train-batch-sizes", big_batch, "--train-dtypes", low]
            + ["--train-compiled", "none", "--lazy-items", lazy_items],
            results=True,
        ),
    ]
    if rehearse:  # the caps are sized for the GPU; two shared CPU cores take longer over less
        plan = [replace(s, cap_s=s.cap_s * REHEARSAL_SLOWER) for s in plan]
        plan += gpu_flag_stages(staging)
    return plan


def gpu_flag_stages(staging: Path) -> list[Stage]:
    """The rehearsal's check of the GPU run's own flags: each benchmark stage's GPU command collected, not run.

    ``--backend cuda`` cannot collect off a GPU (the variants depend on the backend), so it becomes
    ``--backend cpu``; every other flag and value is the GPU run's (its sizes, bf16 specs, scale).
    """
    flags = []
    for s in stages(False, staging):
        if s.results:
            argv = [("cpu" if a == "cuda" and b == "--backend" else a) for b, a in zip([""] + s.argv, s.argv)]
            flags.append(Stage(f"{s.name}-gpu-flags", 120, argv + ["--collect-only"], keep=r"tests? collected"))
    return flags


def run_stage(stage: Stage, timeout: float, logs: Path, results_dir: Path | None) -> tuple[str, int, float]:
    """Run one stage into its log; returns (status, exit code, seconds). A stage past its time is killed whole."""
    argv = list(stage.argv)
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--results", str(results_dir), "--benchmark-json", str(results_dir / "benchmark.json")]
    started = time.monotonic()
    with open(logs / f"{stage.name}.log", "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        # Its own process group (in the check's session, which the device tool ends with the command), so
        # that a timeout, or the check's own end, also ends what the stage started: pytest's children,
        # compute-sanitizer's target.
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, **_OWN_GROUP)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on SIGTERM (SystemExit) or Ctrl-C while waiting
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    if rc is None:
        return "TIMEOUT", -9, seconds
    return ("ok" if rc == 0 else "FAILED"), rc, seconds


# process_group is Python 3.11's; setpgrp before exec is the same where it is missing.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def stage_lines(stage: Stage, log: Path) -> list[str]:
    """What the summary keeps of a stage's log: its matching lines and its last line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    kept = [f"  {x.strip()}" for x in lines if stage.keep and re.search(stage.keep, x)]
    kept.sort(key=lambda x: not re.search(r"FAILED|ERROR", x))  # failures first, should the list be cut
    return kept[:40] + ([f"  last line: {lines[-1].strip()}"] if lines else [])


def merge_results(staging: Path, names: list[str]) -> tuple[dict, list[str]]:
    """Every benchmark stage's results.json under its name, and its results.md under a heading."""
    merged, md = {}, []
    for name in names:
        path = staging / "results" / name
        if (path / "results.json").exists():
            merged[name] = json.loads((path / "results.json").read_text())
            md += [f"## {name}", "", (path / "results.md").read_text(), ""]
    return merged, md


# Besides the targets with a goal, the ratios that answer a question of their own (compile, lazy Adam).
HEADLINE = ("same variant eager", "SparseAdam")


def target_lines(merged: dict, headline: bool = False) -> list[str]:
    """The targets table (ratio against a baseline of the same run, goal where the issue sets one).

    ``headline`` keeps the rows with a goal and those of :data:`HEADLINE`: the table printed last, short
    enough for the device tool's output tail; ``results.md`` has every row.
    """
    lines = ["| stage | target | method | dtype | batch | ratio | goal |", "|---|---|---|---|---|---|---|"]
    for name, payload in merged.items():
        for t in payload.get("targets", []):
            if headline and t["goal"] is None and not any(h in t["what"] for h in HEADLINE):
                continue
            goal = "" if t["goal"] is None else ("≤ " if "share" in t["what"] else "≥ ") + f"{t['goal']:g}"
            met = "" if t["goal"] is None else (" (met)" if _met(t) else " (NOT met)")
            lines.append(
                f"| {name} | {t['what']} | {t['method']} | {t['dtype']} | {t['batch']} "
                f"| {t['ratio']:.3g} | {goal}{met} |"
            )
    return lines


def _met(t: dict) -> bool:
    return t["ratio"] <= t["goal"] if "share" in t["what"] else t["ratio"] >= t["goal"]


def pack_logs(staging: Path, archive: Path) -> list[str]:
    """The text the stages wrote, as one archive under the returned-file limit; returns what was left out.

    Checkpoints and arrays stay out (megabytes each, nothing to read); should the text itself not fit,
    the logs alone go in.
    """
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    text = [p for p in files if p.suffix in TEXT]
    left_out = [f"{p.relative_to(staging)} ({p.stat().st_size:,} bytes)" for p in files if p.suffix not in TEXT]
    for chosen in (text, [p for p in text if p.parent.name == "logs"]):
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            for p in chosen:
                tar.add(p, arcname=str(p.relative_to(staging)))
        if archive.stat().st_size <= MAX_LOGS_BYTES:
            return left_out + [f"{p.relative_to(staging)} (over the size limit)" for p in text if p not in chosen]
    archive.unlink()
    return left_out + [f"logs.tar.gz: even the logs alone are over {MAX_LOGS_BYTES:,} bytes compressed"]


def _setup_command(argv: list[str], log: Path, timeout: float) -> tuple[int | str, str]:
    """Run a set-up command into its log; (exit code or "TIMEOUT", output). Never raises on a hang."""
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        log.write_text(out)
        return "TIMEOUT", out
    log.write_text(p.stdout + p.stderr)
    return p.returncode, p.stdout + p.stderr


def environment(rehearse: bool, logs: Path) -> tuple[list[str], bool]:
    """The device, versions and ``gpu-ann info``, installing the project first on the GPU machine; (lines, ok)."""
    lines, ok = [], True
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        _, text = _setup_command(query, logs / "nvidia-smi.log", 30)
        lines += [f"device: {x}" for x in text.strip().splitlines()]
    else:
        lines.append("device: nvidia-smi not found")
    if not rehearse:  # the GPU machine has every dependency and no network: no deps, no build isolation
        pip = [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
        rc, text = _setup_command(pip, logs / "install.log", 120)
        ok &= rc == 0
        lines.append(f"install (exit {rc})" + ("" if rc == 0 else ": " + text[-500:]))
    rc, text = _setup_command([PY, "-m", "gpu_ann", "info"], logs / "info.log", 60)
    ok &= rc == 0
    lines.append(f"gpu-ann info (exit {rc}):")
    lines += [f"  {x}" for x in text.splitlines() if x.strip()][:30]
    return lines, ok


class Check:
    """One run of the check: its summary so far, the stages' record, and the four files of ``out``."""

    def __init__(self, out: Path, staging: Path, plan: list[Stage], header: str):
        self.out, self.staging, self.plan = out, staging, plan
        self.summary, self.record, self.rerun, self.ok, self.merged = [header], [], [], True, {}

    def say(self, lines: list[str]) -> None:
        """Add lines to the summary and print them now: a run cut off from outside has shown them."""
        self.summary += lines
        print(*lines, sep="\n", flush=True)

    def save(self) -> None:
        """Rewrite the four files from what the stages have left so far."""
        self.merged, md = merge_results(self.staging, [s.name for s in self.plan if s.results])
        header = self.summary[0]
        table = [header, "", *md, "## targets", "", *target_lines(self.merged)]
        (self.out / "results.md").write_text("\n".join(table) + "\n")
        payload = {"header": header, "stages": self.record, "results": self.merged}
        (self.out / "results.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
        (self.staging / "summary.txt").write_text("\n".join(self.summary) + "\n")
        left_out = pack_logs(self.staging, self.out / "logs.tar.gz")
        note = ["not in logs.tar.gz: " + "; ".join(left_out)] if left_out else []
        (self.out / "summary.txt").write_text("\n".join(self.summary + note) + "\n")

    def run(self, stage: Stage, deadline: float, rehearse: bool) -> None:
        """One stage, or the reason it does not run, into the summary and the record."""
        left = deadline - time.monotonic() - RESERVE_S
        status, rc, secs = "SKIPPED", None, 0.0
        if stage.skip:
            self.say([f"{stage.name}: SKIPPED ({stage.skip})"])
        elif left < max(MIN_STAGE_S, MIN_SHARE * stage.cap_s):
            status = "NOT RUN"
            self.rerun.append(stage)
            self.say([f"{stage.name}: NOT RUN ({max(left, 0):.0f} s of the budget left, its cap {stage.cap_s} s)"])
        else:
            timeout = min(stage.cap_s, left)
            results_dir = self.staging / "results" / stage.name if stage.results else None
            log = self.staging / "logs" / f"{stage.name}.log"
            status, rc, secs = run_stage(stage, timeout, log.parent, results_dir)
            self.ok &= status == "ok"
            if status == "TIMEOUT" and timeout < stage.cap_s:  # cut short by the deadline, not by its own cap
                self.rerun.append(stage)
            lines = [f"{stage.name}: {status} (exit {rc}, {secs:.0f} s of {timeout:.0f})", *stage_lines(stage, log)]
            if stage.name == "gpu-tests" and not rehearse and "SKIPPED" in log.read_text():
                self.ok = False
                lines.append("  gpu tests were SKIPPED on a GPU machine: the cuda backend is not usable (see above)")
            self.say(lines)
        self.record.append(dict(stage=stage.name, status=status, exit=rc, seconds=round(secs, 1)))
        self.save()

    def rerun_command(self, rehearse: bool) -> str:
        """The command that runs what the deadline left out, with a budget of just their caps."""
        budget = min(SETUP_S + RESERVE_S + sum(s.cap_s for s in self.rerun), DEFAULT_BUDGET_S)
        names = ",".join(s.name for s in self.rerun)
        return f"bash bench/gpu_check.sh --only {names} --budget {budget}" + (" --rehearse" if rehearse else "")


def _terminate(signum, frame):
    """SIGTERM (the device tool's timeout, ``timeout``): end the running stage and save, by way of ``finally``."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"), help="results folder ($OUT)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}; x{REHEARSAL_SLOWER} with --rehearse)",
    )
    names = ",".join(s.name for s in stages(False, ROOT))
    p.add_argument("--only", default="", help=f"comma-separated stages to run, e.g. for a rerun (default all: {names})")
    p.add_argument("--rehearse", action="store_true", help="the same stages on the CPU at tiny sizes")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = DEFAULT_BUDGET_S * (REHEARSAL_SLOWER if args.rehearse else 1)
    deadline = time.monotonic() + args.budget
    staging = Path(tempfile.mkdtemp(prefix="gpu-ann-check-"))
    (staging / "logs").mkdir()
    plan = stages(args.rehearse, staging)
    only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(only) - {s.name for s in plan})
    if unknown:
        shutil.rmtree(staging)
        p.error(f"--only {args.only!r}: unknown stage(s) {unknown}; stages are {[s.name for s in plan]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in ("summary.txt", "results.md", "results.json", "logs.tar.gz"):
        (out / old).unlink(missing_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    header = (
        f"gpu-ann GPU check{' REHEARSAL on the CPU' if args.rehearse else ''}, "
        f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, commit {commit.stdout.strip() or 'unknown'}, "
        f"budget {args.budget:.0f} s" + (f", only {args.only}" if only else "")
    )
    check = Check(out, staging, plan, header)
    print("==== summary ====", header, sep="\n", flush=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        lines, check.ok = environment(args.rehearse, staging / "logs")
        check.say(lines)
        check.save()
        for stage in plan:
            if not only or stage.name in only:
                check.run(stage, deadline, args.rehearse)
        if check.rerun:
            check.say([f"time ran out; the rest: {check.rerun_command(args.rehearse)}"])
    except BaseException as exc:  # the check itself broke, or was stopped: still leave what it has, and say so
        check.say([f"the check stopped: {exc!r}"])
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        check.save()
        shutil.rmtree(staging, ignore_errors=True)
        print(f"\n==== targets ({out}/results.md has every ratio and measurement) ====")
        print(*target_lines(check.merged, headline=True), sep="\n", flush=True)
    return 0 if check.ok and not check.rerun else 1


if __name__ == "__main__":
    sys.exit(main())
