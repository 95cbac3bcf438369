"""The synthetic generator: valid CSR, the requested size, and the real data's marginals."""

import numpy as np
import pytest
import scipy.sparse as sp

from gpu_ann import synthetic
from gpu_ann.data.readers import load_bundled_anime
from gpu_ann.matrix import validate_csr


@pytest.fixture(scope="module")
def real():
    table = load_bundled_anime()
    matrix = sp.csr_matrix((np.ones(table.nnz), (table.user, table.item)), shape=(table.n_users, table.n_items))
    return synthetic.fit(table), matrix


def test_bundled_size_reproduces_the_real_marginals(real):
    profile, matrix = real
    fake = synthetic.generate(profile, *synthetic.SCALES["bundled"], seed=1)
    validate_csr(fake.indptr, fake.indices, *fake.shape)  # sorted, unique, in range
    want, got = synthetic.describe(matrix), synthetic.describe(fake)
    assert got["interactions"] == pytest.approx(want["interactions"], rel=0.03)
    for key in ("items/user median", "items/user p90", "items/user p99"):
        assert got[key] == pytest.approx(want[key], rel=0.1), key
    for key in ("share of top 1% items", "share of top 10% items"):
        assert got[key] == pytest.approx(want[key], abs=0.05), key


def test_seeded_and_scaled_to_other_catalogues(real):
    profile, _ = real
    a = synthetic.generate(profile, 3000, 20_000, 150_000, seed=5)
    b = synthetic.generate(profile, 3000, 20_000, 150_000, seed=5)
    assert (a != b).nnz == 0
    assert a.shape == (3000, 20_000) and a.nnz == pytest.approx(150_000, rel=0.05)
    assert a.indices.dtype == np.int32  # scipy may narrow indptr; InteractionMatrix widens it to int64
    users, items = synthetic.samples_of(a)
    assert len(users) == a.nnz and (np.diff(a.indptr) == np.bincount(users, minlength=3000)).all()
    np.testing.assert_array_equal(items, a.indices)
