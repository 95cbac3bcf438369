"""Backend choice: made once, cpu always available, cuda refused clearly where it cannot run."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gpu_ann.backend import BackendUnavailable, cuda_unusable_reason, get_backend


def test_cpu_backend_is_numpy_scipy_torch_cpu():
    import scipy.sparse

    b = get_backend("cpu")
    assert b.name == "cpu" and b.xp is np and b.sparse is scipy.sparse
    assert b.torch_device == torch.device("cpu")


@pytest.mark.skipif(cuda_unusable_reason() is None, reason="this machine has a usable GPU")
def test_without_a_gpu_auto_is_cpu_and_cuda_is_refused_with_the_reason():
    assert get_backend("auto").name == "cpu"
    with pytest.raises(BackendUnavailable, match="--backend cuda was asked for but cannot run: .+"):
        get_backend("cuda")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda'"):
        get_backend("tpu")


def test_import_works_without_cupy():
    # Block cupy's import outright, as on a machine where it is not installed.
    code = (
        "import sys; sys.modules['cupy'] = None; sys.modules['cupyx'] = None\n"
        "import gpu_ann\n"
        "from gpu_ann.backend import get_backend, cuda_unusable_reason\n"
        "print(get_backend('auto').name, '|', cuda_unusable_reason())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    name, reason = done.stdout.strip().split(" | ")
    assert name == "cpu" and "cupy is not importable" in reason
