"""Tests for gpu_ann.data.readers: real data sets, small hand-written files, and every DataError case."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_ann.data.readers import BUNDLED_ANIME, load_bundled_anime, read_ratings
from gpu_ann.data.table import DUPLICATE, DataError, RatingsTable

# The copy the quality benchmark ships (bench/data, under MovieLens's license): present in every clone.
ML_SMALL = Path(__file__).resolve().parents[1] / "bench" / "data" / "ml-latest-small" / "ratings.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def pairs(table: RatingsTable) -> list[tuple]:
    """The interactions in raw ids, in table order."""
    return list(zip(table.user_ids[table.user].tolist(), table.item_ids[table.item].tolist(), strict=True))


def assert_well_formed(table: RatingsTable) -> None:
    assert table.user.dtype == np.int32 and table.item.dtype == np.int32
    assert table.user_ids.dtype.kind in "iU" and table.item_ids.dtype.kind in "iU"
    for ids in (table.user_ids, table.item_ids):
        assert np.all(ids[:-1] < ids[1:])  # sorted and unique
    assert table.user.min() == 0 and table.user.max() == table.n_users - 1
    assert table.item.min() == 0 and table.item.max() == table.n_items - 1
    if table.rating is not None:
        assert table.rating.dtype == np.float32 and len(table.rating) == table.nnz
    if table.timestamp is not None:
        assert table.timestamp.dtype == np.int64 and len(table.timestamp) == table.nnz
    if table.item_titles is not None:
        assert table.item_titles.dtype.kind == "U" and len(table.item_titles) == table.n_items
    assert table.summary.rows_kept == table.nnz


# --- real data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anime() -> RatingsTable:
    return load_bundled_anime()


def test_bundled_anime_counts(anime):
    assert BUNDLED_ANIME.is_file()
    assert_well_formed(anime)
    assert anime.summary.rows_read == 419_943
    assert anime.nnz == 419_943
    assert anime.summary.dropped[DUPLICATE] == 0
    assert (anime.n_users, anime.n_items) == (4_714, 7_157)
    assert anime.rating.min() == 1 and anime.rating.max() == 10
    assert np.array_equal(np.unique(anime.rating), np.arange(1, 11, dtype=np.float32))
    assert anime.timestamp is None
    assert anime.user_ids.dtype == np.int64 and anime.item_ids.dtype == np.int64
    assert anime.source == str(BUNDLED_ANIME)


def test_bundled_anime_first_rows_and_titles(anime):
    # The first lines of anime_ratings.dat are "1\t1\t8", "1\t3\t5", "1\t5\t9".
    assert pairs(anime)[:3] == [(1, 1), (1, 3), (1, 5)]
    assert anime.rating[:3].tolist() == [8, 5, 9]
    titles = dict(zip(anime.item_ids.tolist(), anime.item_titles.tolist(), strict=True))
    assert titles[1723] == "Kimi no Na wa."
    assert "" not in titles.values()  # every rated item is in anime_info.dat
    # MyAnimeList's HTML entities are decoded ("Gintama&#039;" in the file).
    assert "Gintama'" in titles.values()
    assert not any("&#039;" in t for t in titles.values())


def test_bundled_anime_ids_save_without_pickle(anime, tmp_path):
    for arr in (anime.user_ids, anime.item_ids, anime.item_titles):
        np.save(tmp_path / "a.npy", arr, allow_pickle=False)
        assert np.array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), arr)


def test_movielens_small():
    table = read_ratings(ML_SMALL)
    assert_well_formed(table)
    assert table.summary.rows_read == table.nnz == 100_836
    assert (table.n_users, table.n_items) == (610, 9_724)
    # First data line: "1,1,4.0,964982703".
    assert pairs(table)[0] == (1, 1)
    assert table.rating[0] == 4.0 and table.timestamp[0] == 964982703
    assert table.rating.min() == 0.5 and table.rating.max() == 5.0
    assert table.item_titles[np.searchsorted(table.item_ids, 1)] == "Toy Story (1995)"
    assert read_ratings(ML_SMALL, fmt="movielens").nnz == 100_836


# --- small files ---------------------------------------------------------------------------------------


def test_index_mapping_matches_hand_built(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,rating\n30,7,1\n10,7,2\n30,5,3\n20,9,4\n")
    t = read_ratings(f)
    assert_well_formed(t)
    assert t.user_ids.tolist() == [10, 20, 30]
    assert t.item_ids.tolist() == [5, 7, 9]
    assert t.user.tolist() == [2, 0, 2, 1]
    assert t.item.tolist() == [1, 1, 0, 2]
    assert t.rating.tolist() == [1, 2, 3, 4]
    assert t.item_titles is None and t.timestamp is None
    assert t.summary.rows_read == 4


def test_headerless_tsv_positions(tmp_path):
    f = write(tmp_path / "r.tsv", "u2\ti1\t5\t100\nu1\ti2\t3.5\t200\n")
    t = read_ratings(f, header=False)
    assert t.user_ids.tolist() == ["u1", "u2"] and t.user_ids.dtype.kind == "U"
    assert pairs(t) == [("u2", "i1"), ("u1", "i2")]
    assert t.rating.tolist() == [5.0, 3.5]
    assert t.timestamp.tolist() == [100, 200]


def test_headerless_columns_by_position(tmp_path):
    f = write(tmp_path / "r.dat", "5\t1\t9\n6\t2\t8\n")  # item, user, rating
    t = read_ratings(f, header=False, user_col=1, item_col="0", rating_col=2)
    assert pairs(t) == [(1, 5), (2, 6)]
    assert t.rating.tolist() == [9, 8]
    # Two columns only: no rating, no timestamp.
    t2 = read_ratings(write(tmp_path / "two.txt", "1 2\n3 4\n"), header=False)
    assert t2.rating is None and t2.timestamp is None and pairs(t2) == [(1, 2), (3, 4)]


def test_string_ids_are_stripped(tmp_path):
    f = write(tmp_path / "r.csv", "user_id,item_id,score\n  alice , x 1 ,1\nbob,x 1,2\nalice,  y,3\n")
    t = read_ratings(f)
    assert t.user_ids.tolist() == ["alice", "bob"] and t.item_ids.tolist() == ["x 1", "y"]
    assert t.user_ids.dtype.kind == "U" and t.item_ids.dtype.kind == "U"
    assert pairs(t) == [("alice", "x 1"), ("bob", "x 1"), ("alice", "y")]
    np.save(tmp_path / "ids.npy", t.item_ids, allow_pickle=False)


def test_mixed_ids_are_strings(tmp_path):
    t = read_ratings(write(tmp_path / "r.csv", "user,item\n1,10\n1,a\n"))
    assert t.item_ids.tolist() == ["10", "a"] and t.user_ids.dtype == np.int64


def test_gzip_csv(tmp_path):
    f = tmp_path / "r.tsv.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("UserID\tMovieID\tRating\tTimestamp\n1\t2\t3\t4\n5\t6\t7\t8\n")
    t = read_ratings(f)
    assert pairs(t) == [(1, 2), (5, 6)]
    assert t.rating.tolist() == [3, 7] and t.timestamp.tolist() == [4, 8]


@pytest.mark.parametrize(
    "text",
    ["uid;iid;value\n1;2;3\n4;5;6\n", "uid iid value\n1  2 3\n4 5   6\n", "uid,iid,value\n1,2,3\n4,5,6\n"],
)
def test_separator_is_sniffed(tmp_path, text):
    t = read_ratings(write(tmp_path / "r.txt", text))
    assert pairs(t) == [(1, 2), (4, 5)] and t.rating.tolist() == [3, 6]


def test_parquet(tmp_path):
    f = tmp_path / "r.parquet"
    pd.DataFrame(
        {"User": ["b", "a", "b"], "item_id": [3, 1, 3], "Rating": [1.0, 2.0, 5.0], "ts": [10, 20, 30]}
    ).to_parquet(f)
    t = read_ratings(f)
    assert t.user_ids.tolist() == ["a", "b"] and t.item_ids.tolist() == [1, 3]
    assert t.item_ids.dtype == np.int64
    assert pairs(t) == [("a", 1), ("b", 3)]  # (b, 3) repeated: the last row wins
    assert t.rating.tolist() == [2.0, 5.0] and t.timestamp.tolist() == [20, 30]
    assert t.summary.dropped[DUPLICATE] == 1


def test_duplicates_keep_last(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,rating,time\n1,1,1,10\n1,2,2,20\n1,1,3,30\n2,1,4,40\n1,1,5,50\n")
    t = read_ratings(f)
    assert t.summary.rows_read == 5
    assert t.summary.dropped[DUPLICATE] == 2
    assert t.summary.rows_kept == t.nnz == 3
    assert pairs(t) == [(1, 2), (2, 1), (1, 1)]
    assert t.rating.tolist() == [2, 4, 5] and t.timestamp.tolist() == [20, 40, 50]
    assert "2 dropped (duplicate (user, item) pair)" in str(t.summary)


def test_explicit_column_names_and_no_rating(tmp_path):
    f = write(tmp_path / "r.csv", "a,b,c\n1,2,x\n3,4,y\n")
    t = read_ratings(f, user_col="b", item_col="a")
    assert pairs(t) == [(2, 1), (4, 3)] and t.rating is None


def test_movielens_titles_from_sibling(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n2,20,3.5,6\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n10,"Heat, The (1995)",Action\n')
    t = read_ratings(tmp_path / "ratings.csv")
    assert t.item_titles.tolist() == ["Heat, The (1995)", ""]


def test_byte_order_mark_crlf_and_quotes(tmp_path):
    f = tmp_path / "r.csv"
    f.write_bytes(b'\xef\xbb\xbfUser,Item,Rating\r\n1,"a, b",3\r\n2,c,4\r\n')
    t = read_ratings(f)
    assert pairs(t) == [(1, "a, b"), (2, "c")] and t.rating.tolist() == [3, 4]


def test_blank_lines_are_skipped(tmp_path):
    t = read_ratings(write(tmp_path / "r.csv", "user,item\n1,2\n\n3,4\n\n"))
    assert pairs(t) == [(1, 2), (3, 4)] and t.summary.rows_read == 2


# --- errors --------------------------------------------------------------------------------------------


def raises(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_ratings(path, **kwargs)
    return str(info.value)


def test_error_file_not_found(tmp_path):
    msg = raises(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg


def test_error_empty_file(tmp_path):
    msg = raises(write(tmp_path / "empty.csv", ""))
    assert "empty.csv" in msg and "empty file" in msg


def test_error_header_only(tmp_path):
    msg = raises(write(tmp_path / "hdr.csv", "user,item,rating\n"))
    assert "hdr.csv" in msg and "no data rows" in msg


def test_error_missing_named_column(tmp_path):
    msg = raises(write(tmp_path / "r.csv", "user,item,stars\n1,2,3\n"), rating_col="rating")
    assert "r.csv" in msg and "'rating'" in msg and "--rating-col" in msg
    assert "['user', 'item', 'stars']" in msg


def test_error_missing_guessed_column(tmp_path):
    msg = raises(write(tmp_path / "r.csv", "who,what\n1,2\n"))
    assert "r.csv" in msg and "user" in msg and "--user-col" in msg and "['who', 'what']" in msg
    msg = raises(write(tmp_path / "one.txt", "1\n2\n"), header=False)
    assert "one.txt" in msg and "item" in msg and "--item-col" in msg and "1 columns" in msg
    msg = raises(write(tmp_path / "r2.txt", "1 2\n"), header=False, rating_col=5)
    assert "r2.txt" in msg and "--rating-col" in msg


def test_error_ragged_row_too_many_fields(tmp_path):
    msg = raises(write(tmp_path / "rag.csv", "user,item,rating\n1,2,3\n4,5,6\n7,8,9,10\n"))
    assert "rag.csv" in msg and "line 4" in msg and "expected 3 fields, saw 4" in msg


def test_error_ragged_row_too_few_fields(tmp_path):
    msg = raises(write(tmp_path / "rag.csv", "user,item,rating\n1,2,3\n\n4,5\n7,8,9\n"))
    assert "rag.csv" in msg and "line 4" in msg and "expected 3 fields, saw 2" in msg


@pytest.mark.parametrize(
    ("value", "problem"),
    [("abc", "is not a number"), ("nan", "is NaN"), ("inf", "is infinite"), ("", "is not a number")],
)
def test_error_bad_rating(tmp_path, value, problem):
    f = write(tmp_path / "ratings.csv", f"userId,movieId,rating\n1,1,4\n1,2,5\n\n2,2,1\n3,3,2\n3,4,{value}\n")
    msg = raises(f)
    assert msg.startswith(f"ratings.csv: line 7, column 'rating': {value!r} {problem}")


def test_error_line_counts_blank_lines_with_whitespace_separator(tmp_path):
    msg = raises(write(tmp_path / "r.txt", "u i r\n1 2 3\n\n2 x y\n"), user_col="u", item_col="i", rating_col="r")
    assert msg == "r.txt: line 4, column 'r': 'y' is not a number"


def test_error_bad_rating_headerless(tmp_path):
    msg = raises(write(tmp_path / "r.tsv", "1\t2\t3\n1\t3\tfive\n"), header=False)
    assert msg == "r.tsv: line 2, column 2 (rating): 'five' is not a number"


def test_error_bad_rating_in_parquet(tmp_path):
    f = tmp_path / "r.parquet"
    pd.DataFrame({"user": [1, 2], "item": [1, 2], "rating": [1.0, float("nan")]}).to_parquet(f)
    assert raises(f) == "r.parquet: row 2, column 'rating': nan is NaN"


def test_error_empty_id(tmp_path):
    msg = raises(write(tmp_path / "r.csv", "user,item,rating\n1,2,3\n  ,5,6\n"))
    assert msg.startswith("r.csv: line 3, column 'user': '  ' is empty")
    msg = raises(write(tmp_path / "r2.tsv", "user\titem\n1\t2\n3\t\n"))
    assert msg.startswith("r2.tsv: line 3, column 'item': '' is empty")


def test_error_zip_without_ratings_member(tmp_path):
    f = tmp_path / "other.zip"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("data/ratings.csv", "user,item\n1,2\n")
        zf.writestr("data/README", "hello")
    msg = raises(f)
    assert "other.zip" in msg and "anime_ratings.dat" in msg
    assert "data/ratings.csv" in msg and "data/README" in msg


def test_error_in_zip_names_member_and_line(tmp_path):
    f = tmp_path / "mini.zip"
    buf = io.StringIO("User_ID\tAnime_ID\tFeedback\n1\t1\t8\n1\t2\tten\n")
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("anime/anime_ratings.dat", buf.getvalue())
    msg = raises(f)
    assert msg == "mini.zip:anime/anime_ratings.dat: line 3, column 'Feedback': 'ten' is not a number"


def test_small_anime_zip_with_titles(tmp_path):
    f = tmp_path / "mini.zip"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("anime/anime_ratings.dat", "User_ID\tAnime_ID\tFeedback\n1\t1\t8\n2\t1\t7\n")
        zf.writestr("anime/anime_info.dat", "anime_ids\tname\tgenre\n1\tA &amp; B\tx\n")
    t = read_ratings(f)
    assert pairs(t) == [(1, 1), (2, 1)] and t.item_titles.tolist() == ["A & B"]
    g = tmp_path / "bare.zip"
    with zipfile.ZipFile(g, "w") as zf:
        zf.writestr("x/anime_ratings.dat", "User_ID\tAnime_ID\tFeedback\n1\t1\t8\n")
    assert read_ratings(g).item_titles is None  # no anime_info.dat: no titles
