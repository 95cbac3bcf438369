"""A small CUDA workload for compute-sanitizer memcheck: every kernel, both output dtypes, edge rows.

Run under ``compute-sanitizer --tool memcheck python bench/sanitizer_workload.py``; it also checks its
own results against the numpy reference and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import assemble_reference  # noqa: E402

from gpu_ann.backend import get_backend  # noqa: E402
from gpu_ann.batching import BatchAssembler  # noqa: E402
from gpu_ann.matrix import InteractionMatrix  # noqa: E402
from gpu_ann.splits import Samples  # noqa: E402


def main() -> int:
    backend = get_backend("cuda")
    rng = np.random.default_rng(0)
    n_users, n_items = 500, 3001
    csr = sp.random(n_users, n_items, density=0.03, format="csr", random_state=0, dtype=np.float32)
    csr.sum_duplicates()
    csr[0] = 0  # an empty row
    csr.eliminate_zeros()
    coo = csr.tocoo()
    # Training samples (target in the row, first and last of their rows included) and held-out ones.
    users = np.concatenate([coo.row, rng.integers(0, n_users, 2000), [0]]).astype(np.int32)
    items = np.concatenate([coo.col, rng.integers(0, n_items, 2000), [n_items - 1]]).astype(np.int32)
    matrix = InteractionMatrix.from_scipy(backend, csr)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        asm = BatchAssembler(matrix, Samples(users, items), 777, dtype=dtype)
        for size in (1, 64, 777):  # one row, a partial buffer, the whole buffer
            batch = rng.integers(0, len(users), size)
            batch[-1] = len(users) - 1  # the empty-row user
            X, y = asm.assemble(asm.to_device_indices(batch))
            ref, labels = assemble_reference(csr.indptr, csr.indices, users, items, batch, n_items)
            got = X.float().cpu().numpy()
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            if not np.allclose(got, ref, rtol=tol, atol=0) or not (y.cpu().numpy() == labels).all():
                print(f"MISMATCH dtype={dtype} size={size}")
                failures += 1
    torch.cuda.synchronize()
    print(f"sanitizer workload: {'OK' if not failures else f'{failures} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
