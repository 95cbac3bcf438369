"""The CPU twin of the assembly kernel against the slow reference."""

import numpy as np
import pytest
from cases import csr_case, hand_case, random_case
from reference import assemble_reference

from gpu_ann.kernels import assemble
from gpu_ann.kernels.assemble import assemble_rows

IMPLICIT = np.empty(0, np.float32)  # length 0: every value 1


@pytest.fixture(autouse=True, params=["whole-rows", "column-chunks"])
def cpu_chunking(request, monkeypatch):
    """Every test here runs both ways the CPU twin writes a row: zeroed whole (batches that fit the cache)
    and in column chunks (larger ones), forced here whatever the batch's size. The chunks are 3 columns, so
    that tiny rows span several and their entries and targets fall on chunk edges; the large-offset test
    keeps the default 1,024 (3 would take minutes at 2**20 columns)."""
    if request.param == "whole-rows":
        monkeypatch.setattr(assemble, "CPU_CHUNK_MIN_BYTES", 2**62)
    else:
        monkeypatch.setattr(assemble, "CPU_CHUNK_MIN_BYTES", 0)
        if request.node.get_closest_marker("slow") is None:
            monkeypatch.setattr(assemble, "CPU_CHUNK_COLUMNS", 3)
    return request.param


def run_cpu(indptr, indices, users, items, batch, n_items, buffer_rows=None, values=IMPLICIT):
    rows = buffer_rows or len(batch)
    out = np.full((rows, n_items + 3), np.nan, dtype=np.float32)  # poisoned: every cell must be written
    labels = np.full(rows, -7, dtype=np.int64)
    assemble_rows(indptr, indices, values, users, items, batch.astype(np.int64), out, labels, target="cpu")
    return out, labels


def test_hand_built_case_matches_reference_and_hand_values():
    indptr, indices, users, items, n = hand_case()
    batch = np.arange(len(users))
    out, labels = run_cpu(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)
    # By hand: user 2 = {0,2,5,9}, target 5 -> {0,2,9} at 1/3, w = 3.
    row = out[2]
    np.testing.assert_allclose(row[[0, 2, 9]], 1 / 3, rtol=1e-7)
    assert row[5] == 0 and row[[1, 3, 4, 6, 7, 8]].sum() == 0
    np.testing.assert_allclose(row[10:], [0.3, np.sqrt(0.3), 0.09], rtol=1e-6)
    # The only item is the target: empty input, w clamped to 1.
    assert out[0, :10].sum() == 0
    np.testing.assert_allclose(out[0, 10:], [0.1, np.sqrt(0.1), 0.01], rtol=1e-6)
    # Held-out target not in the row: nothing removed (user 2 keeps all 4 items).
    np.testing.assert_allclose(out[7, [0, 2, 5, 9]], 0.25)
    assert out[7, 7] == 0


def test_partial_last_batch_leaves_the_rest_of_the_buffer_alone():
    indptr, indices, users, items, n = hand_case()
    batch = np.array([3, 1, 2])
    out, labels = run_cpu(indptr, indices, users, items, batch, n, buffer_rows=8)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out[:3], ref, rtol=1e-6)
    np.testing.assert_array_equal(labels[:3], ref_labels)
    assert np.isnan(out[3:]).all() and (labels[3:] == -7).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_reference(seed):
    indptr, indices, users, items, n = random_case(60, 97, 0.08, seed)
    batch = np.random.default_rng(seed).integers(0, len(users), size=200)
    out, labels = run_cpu(indptr, indices, users, items, batch, n)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(labels, ref_labels)


def test_values_replace_the_implicit_one_and_zero_values_still_count():
    indptr, indices, users, items, n = hand_case()
    # One value per stored entry; entry 1 (user 2's item 0, see cases.HAND_ROWS) is exactly 0.
    values = np.linspace(-0.5, 1.0, len(indices)).astype(np.float32)
    values[1] = 0.0
    batch = np.arange(len(users))
    out, labels = run_cpu(indptr, indices, users, items, batch, n, values=values)
    ref, ref_labels = assemble_reference(indptr, indices, users, items, batch, n, values=values)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, ref_labels)
    # By hand for sample 2: user 2's row, target removed, each kept value over w; the features are the
    # implicit ones, since w counts entries, whatever their values.
    u, t = users[2], items[2]
    lo, hi = indptr[u], indptr[u + 1]
    kept = [(indices[k], values[k]) for k in range(lo, hi) if indices[k] != t]
    for i, v in kept:
        assert out[2, i] == pytest.approx(v / len(kept), rel=1e-6, abs=1e-7)
    f = len(kept) / n
    np.testing.assert_allclose(out[2, n:], [f, np.sqrt(f), f * f], rtol=1e-6)


def test_values_with_bf16_output_round_like_torch():
    import torch

    indptr, indices, users, items, n = random_case(30, 61, 0.1, seed=3)
    values = np.random.default_rng(3).normal(size=len(indices)).astype(np.float32)
    batch = np.random.default_rng(4).integers(0, len(users), size=40).astype(np.int64)
    out, _ = run_cpu(indptr, indices, users, items, batch, n, values=values)
    bf16 = torch.empty((len(batch), n + 3), dtype=torch.bfloat16)
    labels = np.zeros(len(batch), np.int64)
    assemble_rows(indptr, indices, values, users, items, batch, bf16.view(torch.uint16).numpy(), labels, target="cpu")
    np.testing.assert_array_equal(
        bf16.view(torch.uint16).numpy(), torch.from_numpy(out).bfloat16().view(torch.uint16).numpy()
    )


def test_seen_ness_comes_from_structure_not_values():
    # Stored values of exactly 0 (a residual of 0, say) still mark the items as seen: the matrix keeps
    # the structure of whatever CSR it is given, and the kernel reads nothing but that structure.
    import scipy.sparse as sp

    from gpu_ann.backend import get_backend
    from gpu_ann.matrix import InteractionMatrix

    values = sp.csr_matrix((np.array([0.0, 2.0, 0.0]), np.array([1, 3, 4]), np.array([0, 3])), shape=(1, 6))
    assert values.nnz == 3
    m = InteractionMatrix.from_scipy(get_backend("cpu"), values)
    assert m.nnz == 3
    out, _ = run_cpu(m.indptr, m.indices, np.array([0], np.int32), np.array([3], np.int32), np.array([0]), 6)
    np.testing.assert_allclose(out[0, :6], [0, 0.5, 0, 0, 0.5, 0])


def test_bf16_output_is_bit_exact_with_torchs_conversion():
    import torch

    indptr, indices, users, items, n = random_case(40, 301, 0.1, seed=7)
    # Row lengths up to ~60 give 1/w values that need rounding, and f = w/n features too.
    batch = np.random.default_rng(7).integers(0, len(users), size=64).astype(np.int64)
    out32, labels32 = run_cpu(indptr, indices, users, items, batch, n)
    bf16 = torch.empty((len(batch), n + 3), dtype=torch.bfloat16)
    labels = np.empty(len(batch), np.int64)
    assemble_rows(
        indptr,
        indices,
        np.empty(0, np.float32),
        users,
        items,
        batch,
        bf16.view(torch.uint16).numpy(),
        labels,
        target="cpu",
    )
    expected = torch.from_numpy(out32).to(torch.bfloat16)
    assert torch.equal(bf16.view(torch.uint16), expected.view(torch.uint16))
    np.testing.assert_array_equal(labels, labels32)
    # Not trivially equal: some values really were rounded.
    assert (expected.float().numpy() != out32).any()


def test_bf16_rounding_ties_to_even_against_hand_values():
    # n = 512 items; w = 257 and 259 give f = w/512 = 0x3F008000 and 0x3F018000 in float32: exact ties
    # halfway between two bf16 values. Ties go to the even one: 0x3F00 (down) and 0x3F02 (up).
    # 1/257 = 0x3B7F00FF rounds down to 0x3B7F; 1/259 = 0x3B7D08E5 rounds down to 0x3B7D.
    n = 512
    indptr, indices = csr_case([list(range(257)), list(range(259))], n)
    out = np.empty((2, n + 3), np.uint16)
    labels = np.empty(2, np.int64)
    users, targets = np.array([0, 1], np.int32), np.array([n - 1, n - 1], np.int32)  # targets not in the rows
    assemble_rows(indptr, indices, np.empty(0, np.float32), users, targets, np.array([0, 1]), out, labels)
    assert np.float32(257 / 512).view(np.uint32) == 0x3F008000
    assert out[0, n] == 0x3F00 and out[1, n] == 0x3F02
    assert out[0, 0] == 0x3B7F and out[1, 0] == 0x3B7D
    assert out[0, 300] == 0 and out[0, 256] == 0x3B7F and out[0, 257] == 0


@pytest.mark.slow
def test_int64_output_offsets_last_row_of_a_batch_past_2_pow_31_elements():
    # A real large case: 2049 rows x (2**20 - 3 + 3) columns = 2,148,532,224 elements > 2**31, as bf16
    # bits (4.3 GB). The last row starts at element 2048 * 2**20 = 2**31: with 32-bit offsets it would
    # land at a negative address or on row 0.
    n_cols = 2**20
    n = n_cols - 3
    rows = 2049
    assert (rows - 1) * n_cols >= 2**31
    indptr, indices = csr_case([[5, n - 1], [0, 7, 1000, n - 2]], n)
    users = np.array([0, 1], np.int32)
    items = np.array([5, 1000], np.int32)  # both targets in their rows: removed
    batch = np.zeros(rows, np.int64)
    batch[-1] = 1
    out = np.empty((rows, n_cols), np.uint16)
    labels = np.empty(rows, np.int64)
    assemble_rows(indptr, indices, np.empty(0, np.float32), users, items, batch, out, labels)
    last = out[-1]
    third = np.float32(1 / 3).view(np.uint32)
    third_bf16 = (third + 0x7FFF + ((third >> 16) & 1)) >> 16
    assert np.flatnonzero(last[:n]).tolist() == [0, 7, n - 2]
    assert (last[[0, 7, n - 2]] == third_bf16).all()
    assert labels[-1] == 1000 and labels[0] == 5
    assert np.flatnonzero(out[0, :n]).tolist() == [n - 1]  # row 0 untouched by the last row's writes
    assert np.flatnonzero(out[-2, :n]).tolist() == [n - 1]


def test_int64_indptr_rows_past_2_pow_31_stored_entries():
    # indptr values past 2**31 (nnz >= 2**31) without 8.6 GB of indices: a zero-stride view repeats one
    # column index, so the row [2**31 + 5, 2**31 + 9) reads four copies of column 6 at offsets an int32
    # indptr could not hold.
    big = 2**31 + 5
    indices = np.lib.stride_tricks.as_strided(np.array([6], np.int32), shape=(big + 10,), strides=(0,))
    indptr = np.array([0, big, big + 4], np.int64)
    out, labels = run_cpu(indptr, indices, np.array([1], np.int32), np.array([2], np.int32), np.array([0]), 9)
    # Four entries remain (the target 2 is not among them), all at column 6: w = 4.
    np.testing.assert_allclose(out[0, :9], [0, 0, 0, 0, 0, 0, 0.25, 0, 0])
    np.testing.assert_allclose(out[0, 9:], [4 / 9, np.sqrt(4 / 9), (4 / 9) ** 2], rtol=1e-6)


def test_cache_sizes_are_read_as_sysfs_writes_them_and_decide_the_chunking(monkeypatch):
    assert assemble.cache_size_bytes("32768K\n") == 32 * 2**20
    assert assemble.cache_size_bytes("2M") == 2 * 2**20 and assemble.cache_size_bytes("512") == 512
    assert assemble.cache_size_bytes("") is None and assemble.cache_size_bytes("big") is None
    # Chunked exactly when the rows written hold more bytes than the limit: 4 x 103 x 4 = 1,648 bytes here.
    out = np.empty((8, 103), np.float32)
    monkeypatch.setattr(assemble, "CPU_CHUNK_MIN_BYTES", 1648)
    assert assemble.cpu_chunk_columns(4, out) == 0 and assemble.cpu_chunk_columns(5, out) == assemble.CPU_CHUNK_COLUMNS


def test_last_level_cache_is_the_largest_readable_size_else_32_mib(tmp_path, monkeypatch, request):
    request.addfinalizer(assemble.last_level_cache_bytes.cache_clear)  # later tests read the real machine's
    cache = tmp_path / "cache"
    for index, text in (("index0", "48K\n"), ("index2", "1024K\n"), ("index3", "32768K\n"), ("index4", "junk\n")):
        (cache / index).mkdir(parents=True)
        (cache / index / "size").write_text(text)
    (cache / "index1").mkdir()  # a level whose size file is missing: skipped
    pattern = str(cache / "index*" / "size")

    def fresh_cache_bytes():  # read once per process in use; here after every change
        assemble.last_level_cache_bytes.cache_clear()
        return assemble.last_level_cache_bytes()

    real_glob = assemble.glob.glob
    monkeypatch.setattr(assemble.glob, "glob", lambda _: real_glob(pattern))
    assert fresh_cache_bytes() == 32768 * 1024
    (cache / "index3" / "size").write_text("2048K\n")
    assert fresh_cache_bytes() == 2048 * 1024
    monkeypatch.setattr(assemble.glob, "glob", lambda _: [])  # no sysfs (not Linux, a sandbox)
    assert fresh_cache_bytes() == 32 * 2**20
    monkeypatch.setattr(assemble.glob, "glob", lambda _: [str(cache / "index4" / "size")])  # nothing readable
    assert fresh_cache_bytes() == 32 * 2**20
    # The launcher takes its limit from there when no test sets one: 4 x 103 x 4 bytes past a 1,600-byte cache.
    monkeypatch.setattr(assemble, "CPU_CHUNK_MIN_BYTES", None)
    (cache / "index3" / "size").write_text("1600\n")
    for index in ("index0", "index2"):
        (cache / index / "size").write_text("1K\n")
    monkeypatch.setattr(assemble.glob, "glob", lambda _: real_glob(pattern))
    assemble.last_level_cache_bytes.cache_clear()
    out = np.empty((8, 103), np.float32)
    assert assemble.cpu_chunk_columns(3, out) == 0 and assemble.cpu_chunk_columns(4, out) == assemble.CPU_CHUNK_COLUMNS
