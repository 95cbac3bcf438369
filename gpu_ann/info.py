"""The environment report behind ``gpu-ann info``: versions, backends and the GPU, for bug reports.

Every probe is guarded: the report is most wanted on a machine where something is broken (no GPU, no
CuPy, a CUDA install that raises on import), so a failing probe gives ``None`` or ``"error: ..."``
instead of an exception.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

import gpu_ann

# Called through the module, not imported by name, so that tests can monkeypatch
# ``gpu_ann.backend.cuda_unusable_reason`` and this report sees it.
from gpu_ann import backend as _backend

# The CuPy wheels the project's extras install (plain ``cupy`` is the source build).
_CUPY_DISTRIBUTIONS = ("cupy", "cupy-cuda12x", "cupy-cuda13x")


def _probe(func: Callable[[], Any]) -> Any:
    """``func()``, or ``"error: ..."`` if it raises: one broken probe must not hide the rest."""
    try:
        return func()
    except Exception as exc:
        return f"error: {exc.__class__.__name__}: {exc}"


def _distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed.

    Read from the package metadata rather than by importing: importing cupy or numba-cuda on a broken
    CUDA install can fail or be slow, and the version is wanted precisely then.
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version_string(version: int) -> str:
    """CUDA's integer version (``1000 * major + 10 * minor``, e.g. 12040) as ``"12.4"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _cupy_runtime_versions() -> tuple[str | None, str | None]:
    """The CUDA (driver, runtime) versions as CuPy sees them; (None, None) when cupy is not importable."""
    try:
        import cupy
    except ImportError:
        # Not installed: the packages section already says so; not an error of this probe.
        return None, None
    driver = _probe(lambda: _cuda_version_string(cupy.cuda.runtime.driverGetVersion()))
    runtime = _probe(lambda: _cuda_version_string(cupy.cuda.runtime.runtimeGetVersion()))
    return driver, runtime


def _cpu_unusable_reason() -> str | None:
    """None when the CPU backend can be built, else why not (scipy or numba broken, say)."""
    try:
        _backend.CpuBackend()
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def _device_section(cuda_usable: bool) -> dict[str, Any]:
    """What torch and CuPy say about the GPU; all None unless CUDA is usable or torch sees a GPU."""
    device: dict[str, Any] = {
        "count": None,
        "name": None,
        "total_memory_gib": None,
        "compute_capability": None,
        "cuda_driver_version": None,
        "cuda_runtime_version": None,
    }
    torch_sees_gpu = _probe(torch.cuda.is_available) is True
    if not (cuda_usable or torch_sees_gpu):
        # A CPU machine: probing further would only collect "not compiled with CUDA" errors.
        return device
    if torch_sees_gpu:
        # The device torch trains on, the one CudaBackend picks.
        index = _probe(torch.cuda.current_device)
        props = _probe(lambda: torch.cuda.get_device_properties(index))
        device["count"] = _probe(torch.cuda.device_count)
        if isinstance(props, str):  # the probe failed: show the error once, in the name
            device["name"] = props
        else:
            device["name"] = props.name
            device["total_memory_gib"] = round(props.total_memory / 2**30, 2)
            device["compute_capability"] = f"{props.major}.{props.minor}"
    # From CuPy, not torch: torch reports the CUDA it was built with, CuPy the driver and runtime in use.
    device["cuda_driver_version"], device["cuda_runtime_version"] = _cupy_runtime_versions()
    return device


def environment_report() -> dict[str, Any]:
    """Collect what a bug report needs: versions, which backends can run, and the GPU if any.

    Never raises: a probe that fails is reported as None (not installed, not applicable) or as an
    ``"error: ..."`` string. Touches the GPU only through ``cuda_unusable_reason`` (once per process)
    and, where a GPU is present, torch's device properties.

    Returns
    -------
    dict
        JSON-serialisable, with the sections

        ``gpu_ann``
            ``version``.
        ``python``
            ``version``, ``implementation``, ``executable``.
        ``platform``
            ``os``, ``release``, ``machine``, ``cpu_count``, ``usable_cpus`` (the affinity mask, which
            in a container may be fewer than ``cpu_count``), ``torch_threads``.
        ``packages``
            Version strings, None when not installed: ``torch``, ``torch_cuda`` (the CUDA torch was
            built with), ``torch_cuda_built`` (bool), ``numpy``, ``scipy``, ``numba``, ``numba_cuda``,
            ``cupy`` and ``cupy_distribution`` (which of ``cupy``, ``cupy-cuda12x``, ``cupy-cuda13x``;
            comma-separated if several, which clash), ``pandas``, ``pyarrow``.
        ``backends``
            ``cpu`` and ``cuda``, each ``{"usable": bool, "reason": str | None}``; ``auto``, the
            backend ``get_backend("auto")`` would return.
        ``device``
            ``count``, ``name``, ``total_memory_gib``, ``compute_capability`` (from torch),
            ``cuda_driver_version`` and ``cuda_runtime_version`` (from CuPy, like ``"13.0"``); all None
            unless CUDA is usable or torch sees a GPU.

    Examples
    --------
    >>> report = environment_report()
    >>> report["backends"]["auto"] in ("cpu", "cuda")
    True
    """
    cupy_found = [(name, v) for name in _CUPY_DISTRIBUTIONS if (v := _distribution_version(name)) is not None]

    cpu_reason = _cpu_unusable_reason()
    cuda_reason = _probe(_backend.cuda_unusable_reason)
    cuda_usable = cuda_reason is None

    return {
        "gpu_ann": {"version": gpu_ann.__version__},
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "os": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            # Not on macOS or Windows.
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": _probe(torch.get_num_threads),
        },
        "packages": {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "torch_cuda_built": _probe(torch.backends.cuda.is_built),
            "numpy": _distribution_version("numpy"),
            "scipy": _distribution_version("scipy"),
            "numba": _distribution_version("numba"),
            "numba_cuda": _distribution_version("numba-cuda"),
            "cupy": cupy_found[0][1] if cupy_found else None,
            "cupy_distribution": ", ".join(name for name, _ in cupy_found) or None,
            "pandas": _distribution_version("pandas"),
            "pyarrow": _distribution_version("pyarrow"),
        },
        "backends": {
            "cpu": {"usable": cpu_reason is None, "reason": cpu_reason},
            "cuda": {"usable": cuda_usable, "reason": cuda_reason},
            # get_backend's rule, applied without calling it: building CudaBackend would claim the device.
            "auto": "cuda" if cuda_usable else "cpu",
        },
        "device": _device_section(cuda_usable),
    }


def _show(value: Any) -> str:
    """A report value as text: None reads as "-" (not installed / not applicable)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """Render an :func:`environment_report` as an aligned text block for the terminal.

    Parameters
    ----------
    report : dict
        As returned by :func:`environment_report`.

    Returns
    -------
    str
        Five sections (gpu-ann, Python/platform, packages, backends, device), one ``label  value`` line
        per entry with the values aligned; None shows as ``-``. No trailing newline.

    Examples
    --------
    >>> print(format_report(environment_report()))  # doctest: +SKIP
    gpu-ann
      version         0.1.0
    ...
    backends
      backend cpu     usable
      backend cuda    unusable: cupy is not importable (...)
      auto picks      cpu
    ...
    """
    py, plat, pkgs = report["python"], report["platform"], report["packages"]
    backends, device = report["backends"], report["device"]

    def backend_line(name: str) -> str:
        entry = backends[name]
        return "usable" if entry["usable"] else f"unusable: {entry['reason']}"

    torch_line = f"{pkgs['torch']} (CUDA {pkgs['torch_cuda']})" if pkgs["torch_cuda"] else f"{pkgs['torch']} (CPU)"
    cupy_line = f"{pkgs['cupy']} ({pkgs['cupy_distribution']})" if pkgs["cupy"] else "not installed"
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        ("gpu-ann", [("version", report["gpu_ann"]["version"])]),
        (
            "Python/platform",
            [
                ("python", f"{py['version']} ({py['implementation']}) {py['executable']}"),
                ("platform", f"{plat['os']} {plat['release']} {plat['machine']}"),
                ("cpus", f"{plat['cpu_count']} (usable {_show(plat['usable_cpus'])})"),
                ("torch threads", plat["torch_threads"]),
            ],
        ),
        (
            "packages",
            [
                ("torch", torch_line),
                *(
                    (name, pkgs[key] or "not installed")
                    for name, key in (
                        ("numpy", "numpy"),
                        ("scipy", "scipy"),
                        ("numba", "numba"),
                        ("numba-cuda", "numba_cuda"),
                    )
                ),
                ("cupy", cupy_line),
                ("pandas", pkgs["pandas"] or "not installed"),
                ("pyarrow", pkgs["pyarrow"] or "not installed"),
            ],
        ),
        (
            "backends",
            [
                ("backend cpu", backend_line("cpu")),
                ("backend cuda", backend_line("cuda")),
                ("auto picks", backends["auto"]),
            ],
        ),
    ]
    if any(value is not None for value in device.values()):
        memory = device["total_memory_gib"]
        sections.append(
            (
                "device",
                [
                    ("name", device["name"]),
                    ("count", device["count"]),
                    ("memory", f"{memory} GiB" if memory is not None else None),
                    ("compute cap.", device["compute_capability"]),
                    ("CUDA driver", device["cuda_driver_version"]),
                    ("CUDA runtime", device["cuda_runtime_version"]),
                ],
            )
        )
    else:
        sections.append(("device", [("gpu", "none reported (torch sees no GPU)")]))

    # One column width across all sections, so the values line up down the whole block.
    width = max(len(label) for _, rows in sections for label, _ in rows) + 2
    lines: list[str] = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {label:<{width}}{_show(value)}" for label, value in rows)
    return "\n".join(lines)
