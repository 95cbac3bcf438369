"""The bad-input catalogue: one small file per case, each ending in documented handling or a DataError that
names the file, the line (or row), the column and the value. README "Input rules" lists the same cases."""

from __future__ import annotations

import gzip
import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gpu_ann.backend import get_backend
from gpu_ann.checkpoint import load_data, save_data
from gpu_ann.data import table as table_module
from gpu_ann.data.readers import read_ratings
from gpu_ann.data.table import COLD_ITEMS, COLD_USERS, DUPLICATE, UNRATED, DataError, RatingsTable
from gpu_ann.loader import BatchLoader
from gpu_ann.matrix import InteractionMatrix
from gpu_ann.splits import TRAIN, splits_from_tables
from gpu_ann.training import TrainConfig, train

RATINGS = "user,item,rating\n1,2,5\n"  # a valid first data line for the cases below


def parquet(frame: pd.DataFrame):
    return lambda path: frame.to_parquet(path)


def gz(data: bytes, keep: float = 1.0):
    """A gzip of ``data``, cut to its first ``keep`` share."""
    packed = gzip.compress(data)
    return packed[: int(len(packed) * keep)]


def anime_zip(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


# Enough rows that the compressed data is longer than the headers, so a cut lands inside it.
_LONG = "User_ID\tAnime_ID\tFeedback\n" + "".join(f"{u}\t{u % 97}\t{u % 10 + 1}\n" for u in range(3000))
_ZIP = anime_zip({"anime/anime_ratings.dat": _LONG})
_ZIP_DAMAGED = bytearray(_ZIP)
_ZIP_DAMAGED[200:210] = bytes(10)  # inside the deflated member, past its local header (about 60 bytes)

# case, file name, content (text, bytes, or a function writing the file), read_ratings options, the exact error
ERRORS = [
    ("empty file", "e.csv", "", {}, "e.csv: empty file"),
    ("header only", "h.csv", "user,item,rating\n", {}, "h.csv: header only, no data rows"),
    (
        "missing column", "m.csv", "user,rating\n1,5\n", {},
        "m.csv: no item column found; columns are ['user', 'rating']; name it with --item-col (item_col=)",
    ),
    (
        "misnamed column", "n.csv", "user,item,stars\n1,2,5\n", {"rating_col": "rating"},
        "n.csv: rating column 'rating' not found; columns are ['user', 'item', 'stars']; "
        "set it with --rating-col (rating_col=)",
    ),
    (
        "wrong delimiter", "w.tsv", RATINGS, {},
        "w.tsv: no user column found; columns are ['user,item,rating']; name it with --user-col (user_col=) "
        "(read as one column with separator '\\t', but the file contains ',': try sep=',')",
    ),
    ("ragged row, too many fields", "r.csv", RATINGS + "3,4,5,6\n", {}, "r.csv: line 3: expected 3 fields, saw 4"
     " (ragged row)"),
    ("ragged row, too few fields", "r.csv", RATINGS + "3,4\n", {}, "r.csv: line 3: expected 3 fields, saw 2"
     " (ragged row)"),
    ("empty id", "i.csv", RATINGS + " ,4,5\n", {}, "i.csv: line 3, column 'user': ' ' is empty: every row needs"
     " a user id"),
    ("non-numeric rating", "x.csv", RATINGS + "1,3,good\n", {}, "x.csv: line 3, column 'rating': 'good' is not"
     " a number"),
    ("NaN rating", "x.csv", RATINGS + "1,3,NaN\n", {}, "x.csv: line 3, column 'rating': 'NaN' is NaN"),
    ("infinite rating", "x.csv", RATINGS + "1,3,-inf\n", {}, "x.csv: line 3, column 'rating': '-inf' is infinite"),
    (
        "rating outside the given scale", "s.csv", RATINGS + "1,3,7\n", {"rating_scale": (1, 5)},
        "s.csv: line 3, column 'rating': '7' is outside the rating scale [1, 5] (rating_scale); "
        "rating_scale=None reads any rating",
    ),
    (
        "rating outside the MovieLens scale", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,4.5,9\n1,3,0,9\n",
        {},
        "ratings.csv: line 3, column 'rating': '0' is outside the rating scale [0.5, 5] (declared for MovieLens "
        "data); rating_scale=None reads any rating",
    ),
    (
        "rating outside the MyAnimeList scale", "rating.csv", "user_id,anime_id,rating\n1,2,10\n1,3,-2\n", {},
        "rating.csv: line 3, column 'rating': '-2' is outside the rating scale [1, 10] (declared for MyAnimeList "
        "data; -1 means not rated); rating_scale=None reads any rating",
    ),
    (
        "CRLF line ends keep the line numbers", "c.csv", "user,item,rating\r\n1,2,5\r\n\r\n1,3,x\r\n", {},
        "c.csv: line 4, column 'rating': 'x' is not a number",
    ),
    (
        "truncated gzip", "t.csv.gz", gz(RATINGS.encode() * 500, keep=0.5), {},
        "t.csv.gz: truncated or damaged compressed data "
        "(EOFError: Compressed file ended before the end-of-stream marker was reached)",
    ),
    (
        "not gzip at all", "p.csv.gz", RATINGS, {},
        "p.csv.gz: truncated or damaged compressed data (BadGzipFile: Not a gzipped file (b'us'))",
    ),
    (
        "truncated zip", "a.zip", _ZIP[: len(_ZIP) // 2], {},
        "a.zip: not a zip archive, or a truncated one (no zip directory at its end)",
    ),
    (
        "zip without the expected member", "o.zip", anime_zip({"data/ratings.csv": RATINGS}), {},
        "o.zip: no member ending in 'anime_ratings.dat'; members are ['data/ratings.csv']",
    ),
    (
        "Parquet: fractional float user ids", "f.parquet", parquet(pd.DataFrame({"user": [1.0, 2.5], "item": [1, 2]})),
        {}, "f.parquet: row 2, column 'user': 2.5 is not a whole number: ids must be integers or text",
    ),
    (
        "Parquet: float ids beyond exact integers", "f.parquet",
        parquet(pd.DataFrame({"user": [1.0, 1e17], "item": [1, 2]})), {},
        "f.parquet: row 2, column 'user': 1e+17 is too large to be an exact integer id in a float column",
    ),
    (
        "Parquet: uint64 ids beyond int64", "f.parquet",
        parquet(pd.DataFrame({"user": np.array([1, 2**63 + 1], np.uint64), "item": [1, 2]})), {},
        "f.parquet: row 2, column 'user': 9223372036854775809 does not fit in a 64-bit integer id",
    ),
    (
        "Parquet: string ratings", "f.parquet",
        parquet(pd.DataFrame({"user": [1, 2], "item": [1, 2], "rating": ["4.5", "five"]})), {},
        "f.parquet: row 2, column 'rating': 'five' is not a number",
    ),
]  # fmt: skip


def make(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes | bytearray):
        path.write_bytes(bytes(content))
    else:
        path.write_bytes(content.encode())
    return path


@pytest.mark.parametrize(("name", "content", "options", "message"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_error_catalogue(tmp_path, name, content, options, message):
    with pytest.raises(DataError) as info:
        read_ratings(make(tmp_path, name, content), **options)
    assert str(info.value) == message


def test_damaged_zip_member_names_the_member(tmp_path):
    with pytest.raises(DataError) as info:
        read_ratings(make(tmp_path, "d.zip", _ZIP_DAMAGED))
    # zlib or the CRC check finds it, depending on which bytes the damage hit.
    assert str(info.value).startswith("d.zip:anime/anime_ratings.dat: truncated or damaged compressed data (")


def test_too_many_ids_for_int32_indices(tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "_MAX_IDS", 2)  # 2**31 - 1 real ids would not fit in a test
    with pytest.raises(DataError) as info:
        read_ratings(make(tmp_path, "u.csv", "user,item\n1,1\n2,1\n3,1\n"))
    assert str(info.value) == "u.csv, column 'user': 3 distinct user ids; indices are int32, so at most 2 fit"


def test_bad_settings_are_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"rating_scale must be .* got \(5, 1\)"):
        read_ratings(tmp_path / "never-read.csv", rating_scale=(5, 1))
    with pytest.raises(ValueError, match="unrated must be .* got nan"):
        read_ratings(tmp_path / "never-read.csv", unrated=float("nan"))


# --- documented handling -----------------------------------------------------------------------------


def pairs(t: RatingsTable) -> list[tuple]:
    return list(zip(t.user_ids[t.user].tolist(), t.item_ids[t.item].tolist(), strict=True))


def test_non_numeric_ids_are_text_ids(tmp_path):
    t = read_ratings(make(tmp_path, "r.csv", "user,item\nu1,7\n2,8\n"))
    assert t.user_ids.tolist() == ["2", "u1"] and t.item_ids.tolist() == [7, 8]
    assert pairs(t) == [("u1", 7), ("2", 8)]


def test_myanimelist_minus_one_is_an_interaction_without_a_score(tmp_path):
    t = read_ratings(make(tmp_path, "rating.csv", "user_id,anime_id,rating\n1,20,8\n1,21,-1\n2,20,-1\n2,22,10\n"))
    assert pairs(t) == [(1, 20), (1, 21), (2, 20), (2, 22)]
    np.testing.assert_array_equal(t.rating, [8, np.nan, np.nan, 10])
    assert t.rated.tolist() == [True, False, False, True]
    assert t.summary.flagged == {UNRATED: 2} and t.summary.unrated == 2
    # Still an interaction for implicit training: user 1's matrix row holds anime 20 and 21.
    m = InteractionMatrix.from_pairs(get_backend("cpu"), t.user, t.item, t.n_users, t.n_items)
    assert t.item_ids[m.row(0)].tolist() == [20, 21]


def test_unrated_value_for_other_files_and_minus_one_otherwise(tmp_path):
    f = make(tmp_path, "r.csv", "user,item,rating\n1,2,-1\n1,3,4\n")
    assert read_ratings(f).rating.tolist() == [-1, 4]  # no declared convention: -1 is a rating
    t = read_ratings(f, unrated=-1)
    assert np.isnan(t.rating[0]) and t.rating[1] == 4 and t.summary.unrated == 1


def test_duplicate_pairs_keep_the_last_row_and_are_counted(tmp_path):
    t = read_ratings(make(tmp_path, "d.csv", "user,item,rating\n1,2,3\n1,2,4\n2,2,1\n1,2,5\n"))
    assert pairs(t) == [(2, 2), (1, 2)] and t.rating.tolist() == [1, 5]
    assert t.summary.dropped == {DUPLICATE: 2} and t.summary.rows_read == 4 and t.summary.rows_kept == 2


def test_64_bit_ids_survive_the_round_trip(tmp_path):
    t = read_ratings(make(tmp_path, "b.csv", "user,item\n9000000000,1\n-9000000000,2\n9000000000,2\n"))
    assert t.user_ids.dtype == np.int64 and t.user_ids.tolist() == [-9_000_000_000, 9_000_000_000]
    assert t.user.dtype == np.int32 and t.user.tolist() == [1, 0, 1]
    save_data(tmp_path, t, np.zeros(t.nnz, np.uint8))
    back, _ = load_data(tmp_path)
    assert back.user_ids.dtype == np.int64 and back.user_ids.tolist() == t.user_ids.tolist()


def test_integers_beyond_int64_stay_text(tmp_path):
    t = read_ratings(make(tmp_path, "h.csv", "user,item\n99999999999999999999,1\n5,1\n"))
    assert t.user_ids.tolist() == ["5", "99999999999999999999"]


def test_parquet_whole_float_ids_and_numeric_text_ratings(tmp_path):
    frame = pd.DataFrame({"user": [3.0, 9e9], "item": [1, 2], "rating": ["4.5", " 2 "]})
    t = read_ratings(make(tmp_path, "ok.parquet", parquet(frame)))
    assert t.user_ids.dtype == np.int64 and t.user_ids.tolist() == [3, 9_000_000_000]
    assert t.rating.tolist() == [4.5, 2.0]


def test_ids_are_stripped(tmp_path):
    t = read_ratings(make(tmp_path, "s.csv", "user,item\n  ann , 7 \nann,7\nbob,8\n"))
    assert pairs(t) == [("ann", 7), ("bob", 8)] and t.summary.dropped == {DUPLICATE: 1}


def test_mixed_case_headers(tmp_path):
    f = make(tmp_path, "m.csv", "USER_ID,Item,RaTiNg\n1,2,3\n")
    t = read_ratings(f)
    assert pairs(t) == [(1, 2)] and t.rating.tolist() == [3]
    t = read_ratings(f, user_col="user_id", item_col=" ITEM ", rating_col="rating")
    assert pairs(t) == [(1, 2)] and t.rating.tolist() == [3]


def test_crlf_and_byte_order_mark(tmp_path):
    t = read_ratings(make(tmp_path, "b.csv", b"\xef\xbb\xbfuser\titem\trating\r\n1\t2\t3.5\r\n"))
    assert pairs(t) == [(1, 2)] and t.rating.tolist() == [3.5]
    t = read_ratings(make(tmp_path, "b.csv.gz", gzip.compress(b"\xef\xbb\xbfuser,item\r\nx,y\r\n")))
    assert pairs(t) == [("x", "y")]


def test_latin1_titles_fall_back_with_a_warning(tmp_path, caplog):
    make(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n2,20,3.5,6\n")
    movies = b"movieId,title,genres\n10,Am\xe9lie (2001),Comedy\n20,Heat (1995),Action\n"
    make(tmp_path, "movies.csv", movies)
    with caplog.at_level(logging.WARNING, logger="gpu_ann.data"):
        t = read_ratings(tmp_path / "ratings.csv")
    assert t.item_titles.tolist() == ["Amélie (2001)", "Heat (1995)"]
    offset = movies.index(b"\xe9")
    note = f"movies.csv is not UTF-8 (byte 0xe9 at byte offset {offset}): read as Latin-1"
    assert [r.getMessage() for r in caplog.records] == [note]
    assert t.summary.notes == [note] and str(t.summary).endswith("; " + note)


def test_latin1_ids_and_error_lines_after_the_fallback(tmp_path):
    t = read_ratings(make(tmp_path, "l.csv", b"user,item\nJos\xe9,1\n"))
    assert t.user_ids.tolist() == ["José"]
    with pytest.raises(DataError) as info:
        read_ratings(make(tmp_path, "l2.csv", b"user,item,rating\nJos\xe9,1,5\nAnn,2,x\n"))
    assert str(info.value) == "l2.csv: line 3, column 'rating': 'x' is not a number"


def test_summary_counts_everything_the_reader_did(tmp_path):
    t = read_ratings(make(tmp_path, "rating.csv", "user_id,anime_id,rating\n1,10,8\n1,10,9\n\n2,10,-1\n2,11,7\n"))
    assert str(t.summary) == (
        "4 rows read, 3 kept, 1 dropped (duplicate (user, item) pair), 1 kept without a score (unrated), "
        "1 blank line skipped, ratings checked against [1, 10]"
    )
    assert (t.summary.rows_read, t.summary.rows_kept, t.summary.blank_lines) == (4, 3, 1)


# --- splits, batches and training ------------------------------------------------------------------------


def test_split_files_with_users_and_items_absent_from_training(tmp_path):
    train_t = read_ratings(make(tmp_path, "train.csv", "user,item\na,x\na,y\nb,x\n"))
    val_t = read_ratings(make(tmp_path, "val.csv", "user,item\nc,x\na,z\n"))
    table, splits, assignment = splits_from_tables(train_t, val_t)
    assert table.user_ids.tolist() == ["a", "b", "c"] and table.item_ids.tolist() == ["x", "y", "z"]
    assert table.cold_start_counts(assignment == TRAIN) == {COLD_USERS: 1, COLD_ITEMS: 1}
    # Training matrix          x  y  z      validation samples: (c, x), (a, z)
    #                      a   1  1  .      c has an empty input row (w = 1: all zeros, f = 1/3);
    #                      b   1  .  .      z is a label the model never trained on; a keeps both items
    #                      c   .  .  .      (the target z is not in the row), w = 2, f = 2/3.
    m = InteractionMatrix.from_pairs(get_backend("cpu"), splits.train.user, splits.train.item, 3, 3)
    with BatchLoader(m, splits.validation, 8, shuffle=False) as loader:
        (X, y) = next(iter(loader))
        expected = [[0, 0, 0, 1 / 3, (1 / 3) ** 0.5, 1 / 9], [0.5, 0.5, 0, 2 / 3, (2 / 3) ** 0.5, 4 / 9]]
        np.testing.assert_allclose(X.numpy(), expected, rtol=1e-6)
        assert y.tolist() == [0, 2]


def test_user_whose_only_interaction_is_the_target(tmp_path):
    #        i0 i1 i2 i3      sample (u1, i3): nothing left once i3 is removed -> w = 1, row all zeros
    #   u0   1  .  1  .       sample (u0, i0): i2 left -> w = 1, 1/w = 1
    #   u1   .  .  .  1       f = w / 4 = 0.25 for both
    csr = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 1]], np.float32))
    with BatchLoader.from_csr(csr, [1, 0], [3, 0], 2, backend="cpu", shuffle=False) as loader:
        (X, y) = next(iter(loader))
        features = [0.25, 0.5, 0.0625]
        np.testing.assert_allclose(X.numpy(), [[0, 0, 0, 0, *features], [0, 0, 1, 0, *features]], rtol=1e-6)
        assert y.tolist() == [3, 0]


def ratings_file(tmp_path: Path, n_users: int = 30, per_user: int = 4, extra: str = "") -> Path:
    rows = [f"{u},{(u * 7 + k) % 11},{k + 1}" for u in range(n_users) for k in range(per_user)]
    return make(tmp_path, "ratings.csv", "user,item,rating\n" + "\n".join(rows) + "\n" + extra)


def tiny(out: Path, **kw) -> TrainConfig:
    settings = dict(backend="cpu", hidden=(4, 4, 4), batch_size=8, max_steps=2, eval_every=1, eval_batches=1)
    return TrainConfig(out=str(out), **{**settings, **kw})


@pytest.mark.parametrize(
    ("rows", "kw", "message"),
    [
        ("1,1,5\n", {}, "1 interactions give 1 training and 0 validation samples under the random protocol"),
        ("1,1,5\n2,1,4\n3,2,3\n4,2,5\n", {"split": (1.0, 0.0, 0.0)}, "4 interactions give 4 training and 0 validation"),
    ],
    ids=["one interaction", "empty validation split"],
)
def test_training_that_cannot_start_leaves_no_run_directory(tmp_path, rows, kw, message):
    data = make(tmp_path, "small.csv", "user,item,rating\n" + rows)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        train(tiny(out, data=str(data), **kw))
    assert not out.exists()


def test_failing_run_leaves_no_run_directory(tmp_path):
    bad = ratings_file(tmp_path, extra="5,5,oops\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"ratings.csv: line 122, column 'rating': 'oops' is not a number"):
        train(tiny(out, data=str(bad)))
    assert not out.exists()


def test_training_logs_the_reader_summary(tmp_path, caplog):
    data = ratings_file(tmp_path, extra="0,0,9\n\n")  # (0, 0) again: a duplicate; then a blank line
    with caplog.at_level(logging.INFO, logger="gpu_ann.training"):
        train(tiny(tmp_path / "out", data=str(data)))
    expected = str(read_ratings(data).summary)
    assert expected == "121 rows read, 120 kept, 1 dropped (duplicate (user, item) pair), 1 blank line skipped"
    assert any(expected in r.getMessage() for r in caplog.records if r.name == "gpu_ann.training")
