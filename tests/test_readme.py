"""The README's two set-up commands: CI runs the test command word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = readme_commands()
    assert main_job.endswith("gpu-ann train")
    assert "NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim" in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_readme_example_trains_a_user_defined_model_with_the_loader():
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- example: own-model -->", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", block, re.S).group(1)
    assert len(code.splitlines()) < 30
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(losses) == 2 and all(0 < loss < 9.0 for loss in losses)  # ln(7157) = 8.88: it learned a little


def test_readme_commands_name_data_files_that_a_clone_has():
    # A newcomer runs them from the clone's root: a path outside it (../shared/...) fails there.
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", text, re.S)
    paths = [p for block in blocks for p in re.findall(r"--(?:data|train|validation|test) (\S+)", block)]
    assert paths, "the README names no data file in its commands"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"README commands name files a clone does not have: {missing}"
