import os

import pytest

IN_CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_collection_modifyitems(config, items):
    """gpu tests need a usable GPU; cudasim tests run only in the simulator pass; both show as skipped."""
    gpu_reason = None
    if any("gpu" in item.keywords for item in items):
        from gpu_ann.backend import cuda_unusable_reason

        gpu_reason = cuda_unusable_reason()
    for item in items:
        if "gpu" in item.keywords and gpu_reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs a usable NVIDIA GPU: {gpu_reason}"))
        if "cudasim" in item.keywords and not IN_CUDASIM:
            item.add_marker(
                pytest.mark.skip(
                    reason="CUDA simulator test: runs in the second pass, NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim"
                )
            )
