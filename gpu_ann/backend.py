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
    """numpy + scipy.sparse + numba CPU kernels + CPU torch.

    Attributes
    ----------
    name : str
        ``"cpu"``.
    xp : module
        ``numpy``.
    sparse : module
        ``scipy.sparse``.
    torch_device : torch.device
        ``cpu``.
    """

    name = "cpu"

    def __init__(self) -> None:
        import scipy.sparse

        self.xp = np
        self.sparse = scipy.sparse
        self.torch_device = torch.device("cpu")

    def from_host(self, array: np.ndarray) -> np.ndarray:
        """The array, C-contiguous: the same array (no copy) when it already is.

        Parameters
        ----------
        array : numpy.ndarray
            Host array.

        Returns
        -------
        numpy.ndarray
        """
        return np.ascontiguousarray(array)

    def tensor_from_host(self, array: np.ndarray) -> torch.Tensor:
        """A CPU tensor over the array's memory (shared, no copy, when it is C-contiguous).

        Parameters
        ----------
        array : numpy.ndarray
            Host array.

        Returns
        -------
        torch.Tensor
        """
        return torch.from_numpy(np.ascontiguousarray(array))

    def to_host(self, array: Any) -> np.ndarray:
        """The array as numpy: the same memory, no copy, for a numpy array.

        Parameters
        ----------
        array : array_like
            A backend array.

        Returns
        -------
        numpy.ndarray
        """
        return np.asarray(array)

    def kernel_array(self, array: np.ndarray) -> np.ndarray:
        """The form the kernels take: numpy arrays as they are.

        Parameters
        ----------
        array : numpy.ndarray
            A backend array.

        Returns
        -------
        numpy.ndarray
            ``array`` itself.
        """
        return array

    def view_of_tensor(self, tensor: torch.Tensor) -> np.ndarray:
        """A numpy view of a torch buffer, made through DLPack (zero copy).

        Parameters
        ----------
        tensor : torch.Tensor
            A CPU tensor (detached for the view; writes through the view reach the tensor).

        Returns
        -------
        numpy.ndarray
        """
        return np.from_dlpack(tensor.detach())

    def assemble_rows(self, *args) -> None:
        """Run the CPU batch assembly kernel (parallel numba); returns when the batch is written.

        Parameters
        ----------
        *args
            ``indptr, indices, values, sample_users, sample_items, batch, out, labels`` as kernel arrays
            (see ``gpu_ann.kernels.assemble``).
        """
        _assemble.assemble_rows(*args, target="cpu")

    def synchronize(self) -> None:
        """Nothing to wait for on the CPU."""
        pass

    def __repr__(self) -> str:
        return f"CpuBackend(threads={torch.get_num_threads()})"


class CudaBackend:
    """cupy + cupyx.scipy.sparse + numba-cuda kernels + CUDA torch, all on torch's current stream.

    Make it through :func:`get_backend`, which checks first that CUDA can run.

    Parameters
    ----------
    device : int, optional
        CUDA device index, made torch's current device; default: torch's current device.
        CuPy and numba are pointed at the same device.

    Attributes
    ----------
    name : str
        ``"cuda"``.
    xp : module
        ``cupy``.
    sparse : module
        ``cupyx.scipy.sparse``.
    torch_device : torch.device
        The CUDA device everything runs on.
    """

    name = "cuda"

    def __init__(self, device: int | None = None) -> None:
        import cupy
        import cupyx.scipy.sparse
        from numba import cuda

        if device is not None:
            torch.cuda.set_device(device)
        self.xp = cupy
        self.sparse = cupyx.scipy.sparse
        self._cuda = cuda
        self._streams: dict[int, object] = {}
        self.torch_device = torch.device("cuda", torch.cuda.current_device())
        # CuPy, numba and torch on the one device torch uses.
        cupy.cuda.Device(self.torch_device.index).use()
        if self.torch_device.index != 0:
            cuda.select_device(self.torch_device.index)

    def from_host(self, array: np.ndarray):
        """A CuPy copy, for arrays made once and kept for the run (the matrix).

        Host -> device copy from pageable memory: blocks the host until it is done (sync).

        Parameters
        ----------
        array : numpy.ndarray
            Host array.

        Returns
        -------
        cupy.ndarray
        """
        return self.xp.asarray(array)

    def tensor_from_host(self, array: np.ndarray) -> torch.Tensor:
        """A torch copy on the device, for arrays made and freed during the run (sample orders).

        Allocated and copied on torch's current stream, the stream the kernels read them on, so the
        caching allocator cannot hand the block to anyone before those kernels are done with it.
        Host -> device copy from pageable memory: a host-device sync, once per epoch.

        Parameters
        ----------
        array : numpy.ndarray
            Host array.

        Returns
        -------
        torch.Tensor
            On :attr:`torch_device`.
        """
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.torch_device)

    def to_host(self, array: Any) -> np.ndarray:
        """A host copy of a CuPy array.

        Parameters
        ----------
        array : cupy.ndarray
            A device array.

        Returns
        -------
        numpy.ndarray
        """
        # Device -> host copy: a host-device sync.
        return self.xp.asnumpy(array)

    def kernel_array(self, array):
        """A numba device array over a CuPy array, made once so that launches neither convert nor sync.

        Parameters
        ----------
        array : cupy.ndarray
            A device array (anything with ``__cuda_array_interface__``).

        Returns
        -------
        numba.cuda.devicearray.DeviceNDArray
            A view: same memory, no copy.
        """
        return self._cuda.as_cuda_array(array, sync=False)

    def view_of_tensor(self, tensor: torch.Tensor):
        """A numba device view of a torch tensor, through DLPack via CuPy (zero copy).

        The view holds the DLPack capsule, which holds the tensor: the memory lives as long as the view.

        Parameters
        ----------
        tensor : torch.Tensor
            A CUDA tensor on :attr:`torch_device`.

        Returns
        -------
        numba.cuda.devicearray.DeviceNDArray
        """
        return self.kernel_array(self.xp.from_dlpack(tensor.detach()))

    def assemble_rows(self, *args) -> None:
        """Launch the CUDA batch assembly kernel on torch's current stream; asynchronous, no sync.

        Parameters
        ----------
        *args
            ``indptr, indices, values, sample_users, sample_items, batch, out, labels`` as kernel arrays
            (see ``gpu_ann.kernels.assemble``).
        """
        # Launch on the stream torch computes on, so the step that reads the batch is ordered after
        # the kernel that writes it, and the kernel after the step that last read the buffer.
        handle = torch.cuda.current_stream(self.torch_device).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._streams[handle] = self._cuda.external_stream(handle)
        _assemble.assemble_rows(*args, target="cuda", stream=stream)

    def synchronize(self) -> None:
        """Wait for all work on the device (a host-device sync)."""
        torch.cuda.synchronize(self.torch_device)  # host-device sync (timing and tests only)

    def __repr__(self) -> str:
        return f"CudaBackend(device={torch.cuda.get_device_name(self.torch_device)!r})"


@cache
def cuda_unusable_reason() -> str | None:
    """None when the CUDA backend can run here, else why not. Touches the device once per process.

    The answer is cached for the life of the process.

    Returns
    -------
    str or None
        A one-line reason (CuPy missing, no device, simulator enabled, ...), or None.
    """
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
        cupy.empty(1)  # a tiny allocation (no kernel: that would need NVRTC, which training does not)
        cupy.cuda.runtime.deviceSynchronize()
        from numba import cuda

        if not cuda.is_available():
            return "numba-cuda cannot use the device (is numba-cuda installed?)"
        if not torch.cuda.is_available():
            return "this torch build has no CUDA support"
    except Exception as exc:
        return f"CUDA is installed but unusable ({exc.__class__.__name__}: {exc})"
    return None


def get_backend(name: str = "auto", device: int | None = None) -> CpuBackend | CudaBackend:
    """The backend for ``name``.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        ``"auto"`` is cuda when a usable GPU is found, else cpu (with a warning when a GPU is present
        but cannot be used).
    device : int, optional
        CUDA device index (default: torch's current device); ignored by the cpu backend.

    Returns
    -------
    CpuBackend or CudaBackend
        A new backend object on each call.

    Raises
    ------
    BackendUnavailable
        ``"cuda"`` was asked for where it cannot run; the message says why.
    ValueError
        ``name`` is not one of the three.
    """
    if name == "cpu":
        return CpuBackend()
    if name not in ("auto", "cuda"):
        raise ValueError(f"unknown backend {name!r}: expected 'auto', 'cpu' or 'cuda'")
    reason = cuda_unusable_reason()
    if reason is None:
        return CudaBackend(device)
    if name == "cuda":
        raise BackendUnavailable(f"--backend cuda was asked for but cannot run: {reason}")
    if "unusable" in reason or torch.cuda.is_available():
        # A GPU is there (torch sees it, or CUDA answered but failed): say why it is not used.
        warnings.warn(
            f"a GPU was found but the cuda backend cannot use it, so training runs on the CPU: {reason}", stacklevel=2
        )
    return CpuBackend()
