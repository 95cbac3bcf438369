"""Read rating files (the bundled anime zip, MovieLens, CSV/TSV, Parquet) into a :class:`RatingsTable`."""

from __future__ import annotations

import csv
import functools
import gzip
import html
import io
import itertools
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import numpy as np
import pandas as pd

from gpu_ann.data.table import DataError, RatingsTable, ReadSummary

# Resolved from this module rather than ``gpu_ann.__file__`` so it does not depend on the package's __init__.
BUNDLED_ANIME = Path(__file__).resolve().parents[1] / "datasets" / "anime.zip"

FORMATS = ("auto", "anime-zip", "movielens", "csv", "parquet")
DUPLICATE = "duplicate (user, item) pair"
_ROLES = ("user", "item", "rating", "timestamp")
# Header names are compared after lower-casing and removing "_", "-" and spaces ("User_ID" -> "userid").
_GUESSES = {
    "user": ("user", "userid", "uid"),
    "item": ("item", "itemid", "movieid", "animeid", "iid"),
    "rating": ("rating", "score", "feedback", "value"),
    "timestamp": ("timestamp", "time", "ts"),
}
_WHITESPACE = r"\s+"
_INT = r"[+-]?\d+"


@dataclass
class _Source:
    """Where rows come from, so that every error can name the file and the physical line."""

    name: str
    first_line: int  # line (or row) number of data row 0
    unit: str = "line"  # Parquet has rows, not lines
    # Re-reads a line after a bad value, to tell a short (ragged) row from an empty field.
    reopen: Callable[[], AbstractContextManager[IO[str]]] | None = None
    sep: str = ","
    quoting: int = csv.QUOTE_MINIMAL
    n_fields: int = 0

    def fail(self, row: int, column: str, value: object, problem: str) -> NoReturn:
        where = f"{self.name}: {self.unit} {row + self.first_line}"
        fields = self._count_fields(row + self.first_line)
        if fields is not None and fields != self.n_fields:
            # pandas pads short rows with "", which would otherwise be reported as an empty value.
            raise DataError(f"{where}: expected {self.n_fields} fields, saw {fields} (ragged row)")
        value = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
        raise DataError(f"{where}, column {column}: {value!r} {problem}")

    def _count_fields(self, line_no: int) -> int | None:
        if self.reopen is None:
            return None
        with self.reopen() as fh:
            line = next(itertools.islice(fh, line_no - 1, None), "").rstrip("\r\n")
        if len(self.sep) > 1:  # a regular expression, as pandas reads it
            return len(re.split(self.sep, line.strip() if self.sep == _WHITESPACE else line))
        return len(next(csv.reader([line], delimiter=self.sep, quoting=self.quoting), []))


def read_ratings(
    path, *, user_col=None, item_col=None, rating_col=None, timestamp_col=None,
    sep=None, header=True, fmt="auto",
) -> RatingsTable:  # fmt: skip
    """Read a ratings file into a :class:`RatingsTable`.

    Parameters
    ----------
    path : str or os.PathLike
        The bundled-style anime ``.zip``, a MovieLens ``ratings.csv``, any CSV/TSV/``.dat``/``.txt``
        (optionally ``.gz``), or a ``.parquet``/``.pq`` file.
    user_col, item_col, rating_col, timestamp_col : str or int, optional
        Column names (or 0-based positions). When not given they are guessed from the header
        (``user_id``, ``movieId``, ``rating``, ...) or, with ``header=False``, taken as positions
        0, 1, 2 and 3 (rating and timestamp only when the file has that many columns).
    sep : str, optional
        Field separator. Default: tab for ``.tsv``/``.dat``, otherwise sniffed from the first line
        (comma, tab, semicolon or whitespace).
    header : bool
        Whether the first line of a text file holds column names.
    fmt : {"auto", "anime-zip", "movielens", "csv", "parquet"}
        ``"auto"`` picks by suffix; a CSV whose header starts with ``userId,movieId`` is MovieLens.

    Returns
    -------
    RatingsTable
        Ids mapped to contiguous int32 indices; duplicate (user, item) pairs keep their last row and are
        counted in ``summary.dropped``. Lines with every field empty (blank lines) are skipped.

    Raises
    ------
    DataError
        When the file is missing, empty, has no data rows, lacks a column, has a ragged row, a rating that
        is not a finite number or an empty id; the message names the file, line, column and value.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".zip": "anime-zip", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "csv")

    titles = None
    if fmt in ("anime-zip", "parquet"):
        header = True  # both always name their columns
    if fmt == "anime-zip":
        src, frame, titles = _read_anime_zip(path)
    elif fmt == "parquet":
        src, frame = _read_parquet(path)
    else:
        src, frame = _read_text(path, sep=sep, header=header, default_sep="," if fmt == "movielens" else None)
        if fmt == "movielens" or [str(c) for c in frame.columns[:2]] == ["userId", "movieId"]:
            titles = _read_titles(path.parent / "movies.csv", "movieId", "title")
    given = {"user": user_col, "item": item_col, "rating": rating_col, "timestamp": timestamp_col}
    cols = {role: _pick_column(frame, role, given[role], header, src) for role in _ROLES}
    labels = {role: repr(str(c)) if header else f"{c} ({role})" for role, c in cols.items()}
    return _build_table(frame, cols, labels, src, titles, source=str(path))


def load_bundled_anime() -> RatingsTable:
    """Read the anime ratings shipped with the package (see ``gpu_ann/datasets/README.md``).

    Returns
    -------
    RatingsTable
        419,943 ratings (1..10) by 4,714 users on 7,157 anime, with titles.
    """
    return read_ratings(BUNDLED_ANIME)


@contextmanager
def _open_member(path: Path, member: str) -> Iterator[IO[str]]:
    with zipfile.ZipFile(path) as zf, zf.open(member) as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _opener(path: Path) -> Callable[[], AbstractContextManager[IO[str]]]:
    # utf-8-sig: a byte-order mark (spreadsheet exports) would otherwise stick to the first column's name.
    if path.suffix.lower() == ".gz":
        return lambda: gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return lambda: open(path, encoding="utf-8-sig", newline="")


def _read_text(path: Path, *, sep, header: bool, default_sep=None) -> tuple[_Source, pd.DataFrame]:
    reopen = _opener(path)
    with reopen() as fh:
        first = fh.readline()
    if not first:
        raise DataError(f"{path.name}: empty file")
    if sep is None:
        suffix = (Path(path.stem) if path.suffix.lower() == ".gz" else path).suffix.lower()
        sep = default_sep or ("\t" if suffix in (".tsv", ".dat") else _sniff(first))
    src = _Source(path.name, first_line=2 if header else 1, reopen=reopen, sep=sep)
    return src, _parse(src, header)


def _sniff(line: str) -> str:
    if "\t" in line:
        return "\t"
    counts = {",": line.count(","), ";": line.count(";")}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else _WHITESPACE


def _parse(src: _Source, header: bool) -> pd.DataFrame:
    assert src.reopen is not None
    try:
        with src.reopen() as fh:
            # Everything as text, nothing turned into NaN and blank lines kept: row k is line k + first_line.
            frame = pd.read_csv(
                fh,
                sep=src.sep,
                header=0 if header else None,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                quoting=src.quoting,
                # The C parser is fast and names the line of a ragged row; it takes no multi-character sep.
                engine="c" if len(src.sep) == 1 or src.sep == _WHITESPACE else "python",
            )
    except pd.errors.EmptyDataError:
        raise DataError(f"{src.name}: empty file") from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            msg = f"{src.name}: line {m[2]}: expected {m[1]} fields, saw {m[3]} (ragged row)"
            raise DataError(msg) from None
        raise DataError(f"{src.name}: {str(exc).strip()}") from None
    src.n_fields = frame.shape[1]
    frame = frame[~(frame == "").all(axis=1)]
    if frame.empty:
        raise DataError(f"{src.name}: {'header only, ' if header else ''}no data rows")
    return frame


def _read_anime_zip(path: Path) -> tuple[_Source, pd.DataFrame, dict | None]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
    except zipfile.BadZipFile:
        raise DataError(f"{path.name}: not a zip archive") from None
    ratings = next((m for m in members if m.endswith("anime_ratings.dat")), None)
    if ratings is None:
        raise DataError(f"{path.name}: no member ending in 'anime_ratings.dat'; members are {members}")
    # The .dat files are plain tab-separated text: a '"' in a title is a character, not a quote.
    reopen = functools.partial(_open_member, path, ratings)
    src = _Source(f"{path.name}:{ratings}", first_line=2, reopen=reopen, sep="\t", quoting=csv.QUOTE_NONE)
    frame = _parse(src, header=True)
    info = next((m for m in members if m.endswith("anime_info.dat")), None)
    titles = None
    if info is not None:
        with _open_member(path, info) as fh:
            info_frame = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
        titles = _titles_from(info_frame, "anime_ids", "name") or {}
        # The titles come from MyAnimeList's HTML ("Gintama&#039;"); show them as text.
        titles = {k: html.unescape(v) for k, v in titles.items()}
    return src, frame, titles


def _read_titles(path: Path, id_col: str, title_col: str) -> dict | None:
    if not path.is_file():
        return None
    return _titles_from(pd.read_csv(path, dtype=str, keep_default_na=False), id_col, title_col)


def _titles_from(frame: pd.DataFrame, id_col: str, title_col: str) -> dict | None:
    if id_col not in frame.columns or title_col not in frame.columns:
        return None
    return dict(zip(frame[id_col].str.strip(), frame[title_col], strict=True))


def _read_parquet(path: Path) -> tuple[_Source, pd.DataFrame]:
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: empty file")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path.name}: cannot read as Parquet: {exc}") from None
    if frame.empty:
        raise DataError(f"{path.name}: no data rows")
    return _Source(path.name, first_line=1, unit="row"), frame.reset_index(drop=True)


def _pick_column(frame: pd.DataFrame, role: str, given, header: bool, src: _Source):
    columns = list(frame.columns)
    flag = f"--{role}-col ({role}_col=)"
    shown = f"columns are {[str(c) for c in columns]}" if header else f"the file has {len(columns)} columns"
    if given is None:
        if header:
            found = [c for c in columns if re.sub(r"[\s_-]", "", str(c).lower()) in _GUESSES[role]]
            if found:
                return found[0]
        elif _ROLES.index(role) < len(columns):
            return columns[_ROLES.index(role)]
        if role in ("rating", "timestamp"):
            return None
        raise DataError(f"{src.name}: no {role} column found; {shown}; name it with {flag}")
    if isinstance(given, int) or (not header and str(given).isdigit()):
        if 0 <= int(given) < len(columns):
            return columns[int(given)]
    elif given in columns:
        return given
    raise DataError(f"{src.name}: {role} column {given!r} not found; {shown}; set it with {flag}")


def _build_table(
    frame: pd.DataFrame, cols: dict, labels: dict, src: _Source, titles: dict | None, source: str
) -> RatingsTable:
    user_ids, user = _map_ids(frame[cols["user"]], src, labels["user"], "user")
    item_ids, item = _map_ids(frame[cols["item"]], src, labels["item"], "item")
    rating = None
    if cols["rating"] is not None:
        rating = _numbers(frame[cols["rating"]], src, labels["rating"]).astype(np.float32)
    timestamp = None
    if cols["timestamp"] is not None:
        timestamp = _timestamps(frame[cols["timestamp"]], src, labels["timestamp"])

    summary = ReadSummary(rows_read=len(frame))
    # Keep the last of repeated (user, item) rows: later rows usually correct earlier ones.
    dup = pd.Series(user.astype(np.int64) * len(item_ids) + item).duplicated(keep="last").to_numpy()
    summary.dropped[DUPLICATE] = int(dup.sum())
    if dup.any():
        keep = ~dup
        user, item = user[keep], item[keep]
        rating = rating[keep] if rating is not None else None
        timestamp = timestamp[keep] if timestamp is not None else None

    item_titles = None
    if titles is not None:
        if item_ids.dtype.kind == "i":
            titles = {int(k): v for k, v in titles.items() if re.fullmatch(_INT, k)}
        item_titles = np.array([titles.get(i, "") for i in item_ids.tolist()], dtype=str)
    return RatingsTable(
        user=user, item=item, rating=rating, timestamp=timestamp, user_ids=user_ids, item_ids=item_ids,
        item_titles=item_titles, source=source, summary=summary,
    )  # fmt: skip


def _map_ids(col: pd.Series, src: _Source, label: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        raw = col.to_numpy(np.int64)
    else:
        text = col.astype(str).str.strip()
        empty = (col.isna() | (text == "")).to_numpy()
        if empty.any():
            k = int(np.argmax(empty))
            src.fail(col.index[k], label, col.iloc[k], f"is empty: every row needs a {role} id")
        raw = text.to_numpy(dtype=str)
        if text.str.fullmatch(_INT).all():
            try:
                raw = raw.astype(np.int64)
            except OverflowError:  # integers beyond int64 stay text
                pass
    ids, index = np.unique(raw, return_inverse=True)
    return ids, index.astype(np.int32).reshape(-1)


def _numbers(col: pd.Series, src: _Source, label: str) -> np.ndarray:
    text = col if pd.api.types.is_numeric_dtype(col.dtype) else col.astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        k = int(np.argmax(bad))
        value = col.iloc[k]
        try:
            number = float(value)
            problem = "is NaN" if number != number else "is infinite"
        except (TypeError, ValueError):
            problem = "is not a number"
        src.fail(col.index[k], label, value, problem)
    return values


def _timestamps(col: pd.Series, src: _Source, label: str) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return (col.astype("datetime64[s]").astype(np.int64)).to_numpy()
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(np.int64)
    text = col.astype(str).str.strip()
    if text.str.fullmatch(_INT).all():  # exact, even past 2**53 (nanosecond stamps)
        return text.to_numpy(dtype=str).astype(np.int64)
    values = _numbers(col, src, label)
    fractional = values != np.round(values)
    if fractional.any():
        k = int(np.argmax(fractional))
        src.fail(col.index[k], label, col.iloc[k], "is not a whole number of seconds")
    return values.astype(np.int64)
