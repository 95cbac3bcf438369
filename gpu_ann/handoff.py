"""The torch edge: batch buffers owned by torch, written by the kernels through a DLPack view.

One allocator owns batch memory: torch's caching allocator. The model's activations and gradients
live there already, bf16 buffers can only be made by torch (numpy and CuPy have no bf16), and CuPy's
pool does not hand free memory back to torch (cupy#7556). The buffers are allocated once at their
largest size and reused every step; a batch is a view of their first rows, so no step allocates and
no step copies.
"""

from __future__ import annotations

import torch


class BatchBuffers:
    """``X [max_rows, n_cols]`` and ``y [max_rows]`` on the backend's device, with kernel views of both.

    Allocated once by torch (uninitialised); the kernels write through ``X_kernel`` / ``y_kernel``,
    which share memory with ``X`` / ``y``.

    Parameters
    ----------
    backend : CpuBackend or CudaBackend
        Gives the torch device and makes the kernel views.
    max_rows : int
        The largest batch the buffers hold.
    n_cols : int
        Width of ``X`` (``n_items + 3``).
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16`` for ``X``; ``y`` is always int64.

    Raises
    ------
    ValueError
        Any other ``dtype``.
    """

    def __init__(self, backend, max_rows: int, n_cols: int, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"batch dtype {dtype} is not supported: use torch.float32 or torch.bfloat16")
        self.X = torch.empty((max_rows, n_cols), dtype=dtype, device=backend.torch_device)
        self.y = torch.empty(max_rows, dtype=torch.int64, device=backend.torch_device)
        # Made once: the kernels write through these, torch reads self.X / self.y, same memory.
        # bf16 has no numpy or CuPy dtype: the kernel gets the same bytes as uint16 and writes bf16 bits.
        self.X_kernel = backend.view_of_tensor(self.X.view(torch.uint16) if dtype == torch.bfloat16 else self.X)
        self.y_kernel = backend.view_of_tensor(self.y)

    def views(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch tensors of the first ``n_rows`` rows: views, not copies.

        Parameters
        ----------
        n_rows : int
            Rows of the current batch.

        Returns
        -------
        X : torch.Tensor
            ``[n_rows, n_cols]`` view of the input buffer.
        y : torch.Tensor
            ``[n_rows]`` int64 view of the label buffer.
        """
        return self.X[:n_rows], self.y[:n_rows]
