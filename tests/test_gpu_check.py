"""The GPU check fits the device lease: one deadline, stages killed whole at their caps, at most a few flat
files back, and a rehearsal of every stage on the CPU so that a GPU's minutes are not spent on a typo."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the device tool brings back from $OUT: at most 8 files, 16 MiB each, plain names.
RETURNABLE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
RETURNED = {"summary.txt", "results.md", "results.json", "logs.tar.gz"}


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def spawner(tmp_path: Path, delay: float) -> tuple[list[str], Path]:
    """A stage that starts a child which writes a marker after ``delay`` s, then waits a minute; the marker."""
    marker = tmp_path / "grandchild-survived"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep({delay})\nopen({str(marker)!r}, 'w').close()\n")
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); time.sleep(60)"
    return python(code), marker


def test_deadline_caps_and_rerun_command(tmp_path, monkeypatch, capsys):
    gpu_check = load_driver()
    # A stage whose child would write the marker after 4 s: killed at its 2 s cap, the child must die with it
    # (its own process group), or the marker appears.
    hangs, marker = spawner(tmp_path, 4)
    fake = [
        gpu_check.Stage("quick", 10, python("print('measured 42 things')"), keep=r"measured"),
        gpu_check.Stage("hangs", 2, hangs),
        gpu_check.Stage("fails", 10, python("import sys; sys.exit(3)")),
        gpu_check.Stage("skipped", 30, python("pass"), skip="nothing to check"),
        gpu_check.Stage("late", 30, python("pass")),
    ]
    monkeypatch.setattr(gpu_check, "stages", lambda rehearse, staging: fake)
    # gpu-ann info costs a few seconds here: stand it in for the set-up.
    monkeypatch.setattr(gpu_check, "environment", lambda rehearse, logs: (["device: none"], True))
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 5)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    out = tmp_path / "out"
    started = time.monotonic()
    # 9 s: quick (~0.1 s), hangs (killed at 2 s), fails (~0.1 s), then 'late' would have < 5 s after a pause.
    monkeypatch.setattr(gpu_check, "run_stage", slow_after("fails", gpu_check.run_stage, seconds=5))
    rc = gpu_check.main(["--rehearse", "--budget", "9", "--out", str(out)])
    elapsed = time.monotonic() - started
    assert rc == 1
    assert elapsed < 12
    summary = (out / "summary.txt").read_text().splitlines()
    lines = {line.split(":")[0]: line for line in summary if not line.startswith(" ")}
    assert lines["quick"].startswith("quick: ok (exit 0")
    assert "  measured 42 things" in summary
    assert lines["hangs"].startswith("hangs: TIMEOUT (exit -9, 2 s of 2)")
    assert lines["fails"].startswith("fails: FAILED (exit 3")
    assert lines["skipped"] == "skipped: SKIPPED (nothing to check)"
    assert lines["late"].startswith("late: NOT RUN")
    # Its budget: the set-up's 60 s and its cap (reserve patched to 0 here).
    assert "time ran out; the rest: bash bench/gpu_check.sh --only late --budget 90 --rehearse" in summary
    record = json.loads((out / "results.json").read_text())["stages"]
    assert [(r["stage"], r["status"]) for r in record] == [
        ("quick", "ok"),
        ("hangs", "TIMEOUT"),
        ("fails", "FAILED"),
        ("skipped", "SKIPPED"),
        ("late", "NOT RUN"),
    ]
    # The check ran past the moment the grandchild would have written (about 4.2 s in), yet nothing did.
    assert elapsed > 6 and not marker.exists()
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/quick.log", "logs/hangs.log", "logs/fails.log", "summary.txt"} <= names
    assert "summary" in capsys.readouterr().out


def test_a_stage_the_deadline_cuts_short_is_rerun_and_one_without_time_for_half_its_cap_waits(tmp_path, monkeypatch):
    gpu_check = load_driver()
    fake = [
        gpu_check.Stage("cut", 10, python("import time; time.sleep(60)")),  # 6 s of its 10: cut short
        gpu_check.Stage("half", 8, python("pass")),  # under 1 s left of the 4 s it needs: not started
    ]
    monkeypatch.setattr(gpu_check, "stages", lambda rehearse, staging: fake)
    monkeypatch.setattr(gpu_check, "environment", lambda rehearse, logs: ([], True))
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    assert gpu_check.main(["--rehearse", "--budget", "6", "--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "cut: TIMEOUT (exit -9, 6 s of 6)" in summary and "half: NOT RUN" in summary
    assert "--only cut,half --budget 78" in summary  # the set-up's 60 + 10 + 8


def test_sigterm_ends_the_running_stage_and_leaves_what_was_done(tmp_path, monkeypatch):
    # The device tool's timeout (or `timeout`) stops the check: the stage's children must go with it, and
    # the files must hold the stages that finished.
    import signal
    import threading

    gpu_check = load_driver()
    running, marker = spawner(tmp_path, 3)
    fake = [
        gpu_check.Stage("done", 30, python("print('first stage finished')"), keep="finished"),
        gpu_check.Stage("running", 60, running),
        gpu_check.Stage("never", 30, python("pass")),
    ]
    monkeypatch.setattr(gpu_check, "stages", lambda rehearse, staging: fake)
    monkeypatch.setattr(gpu_check, "environment", lambda rehearse, logs: ([], True))
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--rehearse", "--out", str(tmp_path / "out")])
    timer.join()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not gpu_check._terminate  # the handler was put back
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "done: ok" in summary and "  first stage finished" in summary
    assert "the check stopped: SystemExit(143)" in summary and "never" not in summary
    assert [r["stage"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["stages"]] == ["done"]
    time.sleep(2.5)  # past the moment the stage's grandchild would have written (3 s after it started)
    assert not marker.exists()


def slow_after(name, run_stage, seconds):
    """``run_stage`` that sleeps ``seconds`` after running stage ``name``: time passing, without a real stage."""

    def wrapped(stage, timeout, logs, results_dir):
        result = run_stage(stage, timeout, logs, results_dir)
        if stage.name == name:
            time.sleep(seconds)
        return result

    return wrapped


def test_only_runs_the_named_stages_and_refuses_unknown_ones(tmp_path, monkeypatch):
    gpu_check = load_driver()
    fake = [gpu_check.Stage(n, 30, python(f"print({n!r})")) for n in ("a", "b", "c")]
    monkeypatch.setattr(gpu_check, "stages", lambda rehearse, staging: fake)
    monkeypatch.setattr(gpu_check, "environment", lambda rehearse, logs: ([], True))
    assert gpu_check.main(["--rehearse", "--only", "c,a", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert [r["stage"] for r in record] == ["a", "c"]  # the check's order, not the flag's
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--rehearse", "--only", "a,typo", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_logs_archive_holds_text_only_and_falls_back_to_the_logs(tmp_path, monkeypatch):
    gpu_check = load_driver()
    staging = tmp_path / "staging"
    (staging / "logs").mkdir(parents=True)
    (staging / "logs" / "a.log").write_text("hello\n" * 1000)
    (staging / "run").mkdir()
    (staging / "run" / "model.pt").write_bytes(b"\0" * 5000)
    (staging / "run" / "data.npz").write_bytes(b"\0" * 3000)
    (staging / "run" / "metrics.jsonl").write_bytes(os.urandom(40_000))  # incompressible
    left_out = gpu_check.pack_logs(staging, tmp_path / "logs.tar.gz")
    assert left_out == ["run/data.npz (3,000 bytes)", "run/model.pt (5,000 bytes)"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["logs/a.log", "run/metrics.jsonl"]
        assert tar.extractfile("logs/a.log").read() == b"hello\n" * 1000
    # Text over the limit: the logs alone come back, and the rest is named.
    monkeypatch.setattr(gpu_check, "MAX_LOGS_BYTES", 20_000)
    left_out = gpu_check.pack_logs(staging, tmp_path / "logs.tar.gz")
    assert left_out[-1] == "run/metrics.jsonl (over the size limit)"
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert tar.getnames() == ["logs/a.log"]


def test_the_sanitizer_workload_imports_what_it_uses():
    # memcheck runs it only on a GPU: at least its imports and names are checked here.
    spec = importlib.util.spec_from_file_location("sanitizer_workload", ROOT / "bench" / "sanitizer_workload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main) and module.SIZES[-1] == module.MAX_ROWS


def test_headline_keeps_goals_and_the_compile_and_lazy_ratios():
    gpu_check = load_driver()
    target = dict(method="m", dtype="bf16", batch=4096)
    merged = {
        "assembly": {"targets": [dict(target, what="rows/s vs cupyx slice + toarray", ratio=25.0, goal=20.0)]},
        "train-step": {
            "targets": [
                dict(target, what="assembly share of the step (n=17500)", ratio=0.07, goal=0.05),
                dict(target, what="samples/s vs the notebook's 300 rows/s (n=17500)", ratio=9.0, goal=None),
                dict(target, what="samples/s vs the same variant eager with Adam (n=100000)", ratio=1.3, goal=None),
            ]
        },
    }
    headline = gpu_check.target_lines(merged, headline=True)
    assert headline[2:] == [
        "| assembly | rows/s vs cupyx slice + toarray | m | bf16 | 4096 | 25 | ≥ 20 (met) |",
        "| train-step | assembly share of the step (n=17500) | m | bf16 | 4096 | 0.07 | ≤ 0.05 (NOT met) |",
        "| train-step | samples/s vs the same variant eager with Adam (n=100000) | m | bf16 | 4096 | 1.3 |  |",
    ]
    assert len(gpu_check.target_lines(merged)) == len(headline) + 1  # the full table keeps the notebook row


@pytest.mark.slow
def test_rehearsal_runs_every_stage_on_the_cpu_and_returns_four_flat_files(tmp_path):
    out = tmp_path / "out"
    # The documented entry point, with this interpreter; a budget the rehearsal fits on a loaded machine,
    # and SIGTERM (which ends its stages too) should the test's own limit come first.
    proc = subprocess.Popen(
        ["bash", "bench/gpu_check.sh", "--rehearse", "--budget", "800", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == RETURNED
    for p in out.iterdir():
        assert p.is_file() and RETURNABLE_NAME.match(p.name) and p.stat().st_size < 16 * 2**20
    gpu_check = load_driver()
    names = [s.name for s in gpu_check.stages(True, tmp_path)]
    assert names[-4:] == [f"{n}-gpu-flags" for n in ("assembly", "train-step", "compiled", "lazy")]
    record = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in record["stages"]] == names
    assert {r["stage"]: r["status"] for r in record["stages"]} == {
        n: ("SKIPPED" if n == "memcheck" else "ok") for n in names
    }
    # Every benchmark stage's measurements came back, with the ratios the GPU run will be read for.
    results = record["results"]
    assert set(results) == {"assembly", "train-step", "compiled", "lazy"}
    whats = {t["what"] for payload in results.values() for t in payload["targets"]}
    assert "rows/s vs scipy slice + toarray" in whats
    assert "steps/s vs torch.optim.SparseAdam, same gradients (n=20000)" in whats
    same_variant = "samples/s vs the same variant eager with Adam (n=2000)"
    for stage, suffix in (("compiled", " compiled"), ("lazy", " lazy-adam")):
        assert any(t["what"] == same_variant and t["method"].endswith(suffix) for t in results[stage]["targets"])
    with tarfile.open(out / "logs.tar.gz") as tar:
        archived = set(tar.getnames())
        flags = tar.extractfile("logs/compiled-gpu-flags.log").read().decode()
    assert {f"logs/{n}.log" for n in names if n != "memcheck"} <= archived
    assert "large-catalogue/large_catalogue.json" in archived
    # The GPU run's own flags were collected: its compiled bf16 variants at 100k items, B = 4096.
    assert "n100000-B4096-sparse-sampled-bf16-compiled" in flags and "--train-dtypes bf16" in flags
    # The table comes last in what the command prints, where the device tool's output tail has it.
    tail = stdout.rstrip().splitlines()
    assert tail[-1].startswith("| lazy | steps/s vs torch.optim.SparseAdam")
