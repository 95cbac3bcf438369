"""The `gpu-ann info` environment report: real values on this machine, and never an exception."""

import importlib.metadata
import json

import numpy
import pytest
import torch

import gpu_ann
from gpu_ann import backend
from gpu_ann.backend import cuda_unusable_reason
from gpu_ann.info import environment_report, format_report

NO_GPU = cuda_unusable_reason() is not None and not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the report of a machine without a GPU")


@pytest.fixture(scope="module")
def report():
    return environment_report()


def test_versions_are_the_installed_ones(report):
    assert report["gpu_ann"]["version"] == gpu_ann.__version__
    pkgs = report["packages"]
    assert pkgs["torch"] == torch.__version__
    assert pkgs["torch_cuda"] == torch.version.cuda
    assert pkgs["numpy"] == numpy.__version__
    assert pkgs["numba_cuda"] == importlib.metadata.version("numba-cuda")
    for name in ("scipy", "numba", "pandas", "pyarrow"):
        assert pkgs[name] == importlib.metadata.version(name)


def test_platform_section(report):
    plat = report["platform"]
    assert plat["torch_threads"] == torch.get_num_threads()
    assert isinstance(plat["cpu_count"], int) and plat["cpu_count"] >= 1
    assert report["python"]["implementation"]


def test_cupy_is_reported_missing_here(report):
    for name in ("cupy", "cupy-cuda12x", "cupy-cuda13x"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pytest.skip(f"{name} is installed on this machine")
    assert report["packages"]["cupy"] is None
    assert report["packages"]["cupy_distribution"] is None


def test_cpu_backend_is_usable(report):
    assert report["backends"]["cpu"] == {"usable": True, "reason": None}


@needs_no_gpu
def test_without_a_gpu_cuda_is_unusable_for_the_backend_s_reason_and_auto_is_cpu(report):
    cuda = report["backends"]["cuda"]
    assert cuda["usable"] is False
    assert cuda["reason"] == cuda_unusable_reason()
    assert report["backends"]["auto"] == "cpu"
    assert all(value is None for value in report["device"].values())


def test_report_is_json_serialisable(report):
    assert json.loads(json.dumps(report)) == report


@needs_no_gpu
def test_format_report_shows_torch_version_and_cuda_reason(report):
    text = format_report(report)
    assert torch.__version__ in text
    assert f"unusable: {cuda_unusable_reason()}" in text
    for section in ("gpu-ann", "Python/platform", "packages", "backends", "device"):
        assert f"\n{section}\n" in f"\n{text}\n"


def test_format_report_aligns_values(report):
    rows = [line for line in format_report(report).splitlines() if line.startswith("  ")]
    # Every value starts in the same column: the first non-space after the label's padding.
    columns = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in rows}
    assert len(columns) == 1


def test_usable_cuda_makes_auto_cuda_without_touching_a_device(monkeypatch):
    # The report reads the reason through gpu_ann.backend, so patching it there is seen; with torch
    # seeing no GPU and cupy absent, no device probe runs.
    monkeypatch.setattr(backend, "cuda_unusable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = environment_report()
    assert report["backends"]["cuda"] == {"usable": True, "reason": None}
    assert report["backends"]["auto"] == "cuda"
    assert report["device"]["name"] is None
    assert "backend cuda" in format_report(report)
    json.dumps(report)
