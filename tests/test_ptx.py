"""Every CUDA kernel compiles to PTX for sm_90 without a driver.

The simulator forgives code that real CUDA rejects; this compile does not. It needs numba-cuda with
NVVM (the cu13 wheels of the dev extra). A kernel that calls device functions asks the driver for the
current device even when compiling for an explicit target, so that query is answered with a stand-in
for an sm_90 device; ``get_current_device`` is a private name of numba-cuda 0.30 (pinned in dev).
"""

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the simulator cannot compile PTX (first pass only)"
)


class _Sm90:
    compute_capability = (9, 0)
    id = 0


@pytest.fixture
def driverless(monkeypatch):
    from numba.cuda import dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Sm90())


@pytest.mark.parametrize("out_dtype", ["float32", "uint16"])
def test_assemble_kernel_compiles_to_sm90_ptx_without_float64(driverless, out_dtype):
    from numba import cuda, types

    from gpu_ann.kernels.assemble import cuda_kernel

    out_type = getattr(types, out_dtype)  # uint16 = bf16 bits
    sig = (
        types.int64[::1],
        types.int32[::1],
        types.float32[::1],  # values (length 0: implicit)
        types.int32[::1],
        types.int32[::1],
        types.int64[::1],
        out_type[:, ::1],
        types.int64[::1],
    )
    ptx, _ = cuda.compile_ptx(cuda_kernel().py_func, sig, cc=(9, 0))
    assert ".target sm_90" in ptx
    assert "bar.sync" in ptx or "barrier.sync" in ptx  # the barrier between the zero fill and the scatter
    # float32 kernels must not fall back to double-precision arithmetic (slow on the GPU).
    assert ".f64" not in ptx
