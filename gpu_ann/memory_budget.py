"""How many bytes a run may use on its device: free memory on CUDA, available RAM (within a container's
limit) on the CPU. The memory planner (:mod:`gpu_ann.planner`) compares its estimate with this."""

from __future__ import annotations

import os

import torch

MEMINFO = "/proc/meminfo"


def device_budget(device) -> int:
    """Bytes the run may use: free device memory on CUDA, available RAM on the CPU.

    On CUDA: ``torch.cuda.mem_get_info`` (creates the context on first use and waits for the device: a
    host-device sync; call it once, before training) plus what torch's caching allocator has reserved but
    not handed out. On the CPU: ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup v2 limit when
    one is set (containers), else ``os.sysconf`` available pages.

    Parameters
    ----------
    device : torch.device, str, or a backend
        Anything with a ``torch_device`` attribute (``CpuBackend`` / ``CudaBackend``), or a device.

    Returns
    -------
    int
        Bytes.
    """
    device = torch.device(getattr(device, "torch_device", device))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # host-device sync (once, before training)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    available = _meminfo_available()
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_headroom()
    return int(available if limit is None else min(available, limit))


def _meminfo_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """memory.max - memory.current of this process's cgroup v2, or None when unlimited or unreadable."""
    try:
        with open(os.path.join(root, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current")) as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None
