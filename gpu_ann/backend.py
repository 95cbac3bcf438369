"""The one backend seam: ``get_backend("auto" | "cpu" | "cuda")``, chosen once per run.

Both backends have the same methods; nothing on the per-batch path asks which one it has.

=========  ==========================  ===============================
           cpu                         cuda
=========  ==========================  ===============================
arrays     numpy                       cupy
CSR        scipy.sparse                cupyx.scipy.sparse
kernels    numba ``njit(parallel)``    numba-cuda ``cuda.jit``
torch      CPU tensors                 CUDA tensors, torch's stream
=========  ==========================  ===============================

Device memory for batches has one owner, torch's caching allocator (see ``gpu_ann.handoff``); CuPy's
pool holds only the matrix and the sample arrays, allocated once.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from typing import Any

import numpy as np
import torch

from gpu_ann.kernels import assemble as _assemble


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


class CpuBackend:
    """numpy + scipy.sparse + numba CPU kernels + CPU torch."""

    name = "cpu"

    def __init__(self) -> None:
        import scipy.sparse

        self.xp = np
        self.sparse = scipy.sparse
        self.torch_device = torch.device("cpu")

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def kernel_array(self, array: np.ndarray) -> np.ndarray:
        """The form the kernels take: numpy arrays as they are."""
        return array

    def view_of_tensor(self, tensor: torch.Tensor) -> np.ndarray:
        """A numpy view of a torch buffer, made through DLPack (zero copy)."""
        return np.from_dlpack(tensor.detach())

    def assemble_rows(self, *args) -> None:
        _assemble.assemble_rows(*args, target="cpu")

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"CpuBackend(threads={torch.get_num_threads()})"


class CudaBackend:
    """cupy + cupyx.scipy.sparse + numba-cuda kernels + CUDA torch, all on torch's current stream."""

    name = "cuda"

    def __init__(self) -> None:
        import cupy
        import cupyx.scipy.sparse
        from numba import cuda

        self.xp = cupy
        self.sparse = cupyx.scipy.sparse
        self._cuda = cuda
        self.torch_device = torch.device("cuda", torch.cuda.current_device())
        cupy.cuda.Device(self.torch_device.index).use()

    def from_host(self, array: np.ndarray):
        # Host -> device copy from pageable memory: blocks the host until the copy is done (sync).
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        # Device -> host copy: a host-device sync.
        return self.xp.asnumpy(array)

    def kernel_array(self, array):
        """A numba device array over a CuPy array, made once so that launches neither convert nor sync."""
        return self._cuda.as_cuda_array(array, sync=False)

    def view_of_tensor(self, tensor: torch.Tensor):
        """A numba device view of a torch buffer, through DLPack via CuPy (zero copy)."""
        return self.kernel_array(self.xp.from_dlpack(tensor.detach()))

    def assemble_rows(self, *args) -> None:
        # Launch on the stream torch computes on, so the step that reads the batch is ordered after
        # the kernel that writes it, and the kernel after the step that last read the buffer.
        stream = self._cuda.external_stream(torch.cuda.current_stream(self.torch_device).cuda_stream)
        _assemble.assemble_rows(*args, target="cuda", stream=stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)  # host-device sync (timing and tests only)

    def __repr__(self) -> str:
        return f"CudaBackend(device={torch.cuda.get_device_name(self.torch_device)!r})"


@cache
def cuda_unusable_reason() -> str | None:
    """None when the CUDA backend can run here, else why not. Touches the device once per process."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1 is set (the numba CUDA simulator is not a device)"
    try:
        import cupy
        import cupyx.scipy.sparse  # noqa: F401  (needs cuSPARSE: the [ctk] extra)
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return f"cupy is not importable ({exc.__class__.__name__}: {exc}); install gpu-ann[cuda12] or [cuda13]"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
        cupy.zeros(1).sum().item()  # a tiny allocation and launch: the driver really works
        from numba import cuda

        if not cuda.is_available():
            return "numba-cuda cannot use the device (is numba-cuda installed?)"
        if not torch.cuda.is_available():
            return "this torch build has no CUDA support"
    except Exception as exc:
        return f"CUDA is installed but unusable ({exc.__class__.__name__}: {exc})"
    return None


def get_backend(name: str = "auto") -> CpuBackend | CudaBackend:
    """The backend for ``name``: ``"cpu"``, ``"cuda"``, or ``"auto"`` (cuda when usable, else cpu)."""
    if name == "cpu":
        return CpuBackend()
    if name not in ("auto", "cuda"):
        raise ValueError(f"unknown backend {name!r}: expected 'auto', 'cpu' or 'cuda'")
    reason = cuda_unusable_reason()
    if reason is None:
        return CudaBackend()
    if name == "cuda":
        raise BackendUnavailable(f"--backend cuda was asked for but cannot run: {reason}")
    if "unusable" in reason:
        warnings.warn(f"CUDA found but unusable, falling back to the CPU: {reason}", stacklevel=2)
    return CpuBackend()
