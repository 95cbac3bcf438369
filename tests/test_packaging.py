"""The wheel: kernels/ ships as gpu_ann.kernels, the bundled data and py.typed are inside, one version."""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gpu_ann

ROOT = Path(__file__).resolve().parents[1]


def test_installed_version_is_the_package_version():
    assert importlib.metadata.version("gpu-ann") == gpu_ann.__version__


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("gpu_ann-*.whl")
    assert wheel.name.startswith(f"gpu_ann-{gpu_ann.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "gpu_ann/kernels/assemble.py",
        "gpu_ann/kernels/__init__.py",
        "gpu_ann/datasets/anime.zip",
        "gpu_ann/datasets/README.md",
        "gpu_ann/py.typed",
        "gpu_ann/data/readers.py",
    ):
        assert expected in names
    assert not any(n.startswith("kernels/") for n in names)  # not a top-level package
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Provides-Extra: cuda12" in text and "Provides-Extra: cuda13" in text and "Provides-Extra: dev" in text
    assert (
        "gpu-ann = gpu_ann.cli:entry"
        in zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
