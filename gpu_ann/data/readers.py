"""Read rating files (the bundled anime zip, MovieLens, CSV/TSV, Parquet) into a :class:`RatingsTable`."""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import html
import io
import itertools
import logging
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import numpy as np
import pandas as pd

from gpu_ann.data.table import DataError, RatingsTable, build_table

log = logging.getLogger("gpu_ann.data")

# Resolved from this module rather than ``gpu_ann.__file__`` so it does not depend on the package's __init__.
BUNDLED_ANIME = Path(__file__).resolve().parents[1] / "datasets" / "anime.zip"

FORMATS = ("auto", "anime-zip", "movielens", "csv", "parquet")
# The rating scales of the data sets the reader recognises (rating_scale="auto").
DECLARED_SCALES = {"MyAnimeList": (1.0, 10.0), "MovieLens": (0.5, 5.0)}
MAL_UNRATED = -1.0  # MyAnimeList's "watched but not rated"
_ROLES = ("user", "item", "rating", "timestamp")
# Header names are compared after lower-casing and removing "_", "-" and spaces ("User_ID" -> "userid").
_GUESSES = {
    "user": ("user", "userid", "uid"),
    "item": ("item", "itemid", "movieid", "animeid", "iid"),
    "rating": ("rating", "score", "feedback", "value"),
    "timestamp": ("timestamp", "time", "ts"),
}
_WHITESPACE = r"\s+"
# What a truncated or corrupted .gz / .zip raises while it is being read.
_DAMAGED = (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile)


@dataclass
class _Source:
    """Where rows come from, so that every error can name the file and the physical line."""

    name: str
    first_line: int  # line (or row) number of data row 0
    unit: str = "line"  # Parquet has rows, not lines
    open_binary: Callable[[], AbstractContextManager[IO[bytes]]] | None = None  # None: not a text file
    sep: str = ","
    quoting: int = csv.QUOTE_MINIMAL
    n_fields: int = 0
    # utf-8-sig: a byte-order mark (spreadsheet exports) would otherwise stick to the first column's name.
    encoding: str = "utf-8-sig"
    notes: list[str] = field(default_factory=list)  # shared with the summary of the table being read
    blank_lines: int = 0

    @contextmanager
    def open_text(self) -> Iterator[IO[str]]:
        """The decompressed text, in the encoding chosen so far."""
        assert self.open_binary is not None
        with self.open_binary() as raw:
            yield io.TextIOWrapper(raw, encoding=self.encoding, newline="")

    def fail(self, row: int, column: str, value: object, problem: str) -> NoReturn:
        """Raise a DataError naming the file, the line (or row), the column and the value."""
        where = f"{self.name}: {self.unit} {row + self.first_line}"
        fields = self._count_fields(row + self.first_line)
        if fields is not None and fields != self.n_fields:
            # pandas pads short rows with "", which would otherwise be reported as an empty value.
            raise DataError(f"{where}: expected {self.n_fields} fields, saw {fields} (ragged row)")
        value = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
        raise DataError(f"{where}, column {column}: {value!r} {problem}")

    def _count_fields(self, line_no: int) -> int | None:
        """Fields on one physical line, re-read from the file (None for Parquet)."""
        if self.open_binary is None:
            return None
        with self.open_text() as fh:
            line = next(itertools.islice(fh, line_no - 1, None), "").rstrip("\r\n")
        if len(self.sep) > 1:  # a regular expression, as pandas reads it
            return len(re.split(self.sep, line.strip() if self.sep == _WHITESPACE else line))
        return len(next(csv.reader([line], delimiter=self.sep, quoting=self.quoting), []))


def read_ratings(
    path, *, user_col=None, item_col=None, rating_col=None, timestamp_col=None,
    sep=None, header=True, fmt="auto", rating_scale="auto", unrated="auto",
) -> RatingsTable:  # fmt: skip
    """Read a ratings file into a :class:`RatingsTable`.

    Parameters
    ----------
    path : str or os.PathLike
        The bundled-style anime ``.zip``, a MovieLens ``ratings.csv``, any CSV/TSV/``.dat``/``.txt``
        (optionally ``.gz``), or a ``.parquet``/``.pq`` file. Text is UTF-8 (a byte-order mark is
        dropped, CRLF line ends are fine); a file that is not UTF-8 is read as Latin-1, with a logged
        warning that names the first offending byte and its offset.
    user_col, item_col, rating_col, timestamp_col : str or int, optional
        Column names (or 0-based positions). When not given they are guessed from the header, in any
        case (``user_id``, ``movieId``, ``Rating``, ...) or, with ``header=False``, taken as positions
        0, 1, 2 and 3 (rating and timestamp only when the file has that many columns). A given name
        that matches no column exactly may match one ignoring case and surrounding spaces.
    sep : str, optional
        Field separator. Default: tab for ``.tsv``/``.dat``, otherwise sniffed from the first line
        (comma, tab, semicolon or whitespace).
    header : bool
        Whether the first line of a text file holds column names.
    fmt : {"auto", "anime-zip", "movielens", "csv", "parquet"}
        ``"auto"`` picks by suffix; a CSV whose header starts with ``userId,movieId`` is MovieLens.
    rating_scale : "auto", (float, float) or None
        Ratings outside ``[low, high]`` are errors. ``"auto"``: the declared scale of a recognised data
        set (:data:`DECLARED_SCALES`: MyAnimeList, i.e. the anime zip or a file with an ``anime_id``
        column, 1-10; MovieLens 0.5-5), no check for other files. None: any finite rating.
    unrated : "auto", float or None
        A rating value meaning "interacted, not rated": such rows are kept as interactions with a NaN
        rating, counted in ``summary.flagged``. ``"auto"``: ``-1`` for MyAnimeList data, none otherwise.

    Returns
    -------
    RatingsTable
        Raw ids mapped to contiguous int32 indices (ids are int64 when every id is an integer that fits,
        otherwise text with surrounding spaces stripped); duplicate (user, item) pairs keep their last
        row and are counted in ``summary.dropped``; lines with every field empty are skipped and counted.

    Raises
    ------
    DataError
        When the file is missing, empty, truncated or damaged (gzip, zip), has no data rows, lacks a
        column, has a ragged row, a rating that is not a finite number or is outside the scale, an empty
        or fractional id, or more ids than int32 indices hold; the message names the file, line (or
        row), column and value.
    ValueError
        ``rating_scale`` or ``unrated`` is not a valid setting.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_settings(rating_scale, unrated)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".zip": "anime-zip", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "csv")

    titles, notes = None, []
    if fmt in ("anime-zip", "parquet"):
        header = True  # both always name their columns
    if fmt == "anime-zip":
        src, frame, titles = _read_anime_zip(path, notes)
    elif fmt == "parquet":
        src, frame = _read_parquet(path)
    else:
        default_sep = "," if fmt == "movielens" else None
        src, frame = _read_text(path, sep=sep, header=header, default_sep=default_sep, notes=notes)
        if fmt == "movielens" or [str(c) for c in frame.columns[:2]] == ["userId", "movieId"]:
            fmt = "movielens"
            titles = _read_titles(path.parent / "movies.csv", notes)
    given = {"user": user_col, "item": item_col, "rating": rating_col, "timestamp": timestamp_col}
    cols = {role: _pick_column(frame, role, given[role], header, src) for role in _ROLES}
    labels = {role: repr(str(c)) if header else f"{c} ({role})" for role, c in cols.items()}
    dataset = _dataset(fmt, cols["item"], header)
    if rating_scale == "auto":
        rating_scale = DECLARED_SCALES.get(dataset)
    if unrated == "auto":
        unrated = MAL_UNRATED if dataset == "MyAnimeList" else None
    scale = (rating_scale, f"declared for {dataset} data" if dataset else "rating_scale")
    table = build_table(
        frame, cols, labels, src, scale=scale, unrated=unrated, titles=titles, source=str(path),
        blank_lines=src.blank_lines,
    )  # fmt: skip
    table.summary.notes = notes  # the ratings file's and the titles file's
    return table


def load_bundled_anime() -> RatingsTable:
    """Read the anime ratings shipped with the package (see ``gpu_ann/datasets/README.md``).

    Returns
    -------
    RatingsTable
        419,943 ratings (1..10) by 4,714 users on 7,157 anime, with titles.
    """
    return read_ratings(BUNDLED_ANIME)


def _check_settings(rating_scale, unrated) -> None:
    """Refuse a malformed ``rating_scale`` or ``unrated`` before reading anything."""
    if rating_scale not in ("auto", None):
        ok = isinstance(rating_scale, tuple | list) and len(rating_scale) == 2
        ok = ok and all(isinstance(v, int | float) and math.isfinite(v) for v in rating_scale)
        if not ok or rating_scale[0] > rating_scale[1]:
            raise ValueError(f"rating_scale must be 'auto', None or (low, high) with low <= high, got {rating_scale!r}")
    if unrated not in ("auto", None) and not (isinstance(unrated, int | float) and math.isfinite(unrated)):
        raise ValueError(f"unrated must be 'auto', None or a finite number, got {unrated!r}")


def _dataset(fmt: str, item_col, header: bool) -> str | None:
    """The recognised data set whose conventions apply: its rating scale and its "not rated" value."""
    if fmt == "anime-zip" or (header and re.sub(r"[\s_-]", "", str(item_col).lower()) == "animeid"):
        return "MyAnimeList"
    return "MovieLens" if fmt == "movielens" else None


@contextmanager
def _open_member(path: Path, member: str) -> Iterator[IO[bytes]]:
    """One member of a zip archive, as a binary stream."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as raw:
        yield raw


def _binary_opener(path: Path) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    """Opens the file's (decompressed, for ``.gz``) bytes."""
    if path.suffix.lower() == ".gz":
        return lambda: gzip.open(path, "rb")
    return lambda: open(path, "rb")


@contextmanager
def _damage_is_data_error(src: _Source) -> Iterator[None]:
    """Turn what a truncated or corrupted .gz/.zip raises into a DataError naming the file."""
    try:
        yield
    except _DAMAGED as exc:
        raise DataError(f"{src.name}: truncated or damaged compressed data ({type(exc).__name__}: {exc})") from None


def _with_fallback(src: _Source, read: Callable[[], object]):
    """``read()``, once more as Latin-1 (logged, noted in the summary) if the text is not UTF-8."""
    try:
        with _damage_is_data_error(src):
            return read()
    except UnicodeDecodeError:
        pass
    offset, byte = _first_bad_utf8(src)
    note = f"{src.name} is not UTF-8 (byte 0x{byte:02x} at byte offset {offset:,}): read as Latin-1"
    log.warning("%s", note)
    src.notes.append(note)
    src.encoding = "latin-1"  # every byte is a Latin-1 character: this read cannot fail to decode
    with _damage_is_data_error(src):
        return read()


def _first_bad_utf8(src: _Source) -> tuple[int, int]:
    """Offset and value of the first byte that is not valid UTF-8 (read again: only on the failure path)."""
    assert src.open_binary is not None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _damage_is_data_error(src), src.open_binary() as raw:
        for chunk in itertools.chain(iter(functools.partial(raw.read, 1 << 20), b""), [None]):
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk or b"", final=chunk is None)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start, exc.object[exc.start]
            offset += len(chunk or b"")
    raise AssertionError(f"{src.name}: the text decodes as UTF-8 on a second read")


def _read_csv(src: _Source, **options) -> pd.DataFrame:
    """The whole source as a frame of text, nothing turned into NaN."""

    def read():
        with src.open_text() as fh:
            return pd.read_csv(fh, sep=src.sep, dtype=str, keep_default_na=False, quoting=src.quoting, **options)

    try:
        return _with_fallback(src, read)
    except pd.errors.EmptyDataError:
        raise DataError(f"{src.name}: empty file") from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise DataError(f"{src.name}: line {m[2]}: expected {m[1]} fields, saw {m[3]} (ragged row)") from None
        raise DataError(f"{src.name}: {str(exc).strip()}") from None


def _first_line(src: _Source) -> str:
    """The first line of text (to sniff the separator), with the same fallbacks as the full read."""

    def read():
        with src.open_text() as fh:
            return fh.readline()

    return _with_fallback(src, read)


def _read_text(path: Path, *, sep, header: bool, default_sep, notes: list[str]) -> tuple[_Source, pd.DataFrame]:
    """A CSV/TSV/whitespace file (optionally .gz) as text columns."""
    src = _Source(path.name, first_line=2 if header else 1, open_binary=_binary_opener(path), notes=notes)
    first = _first_line(src)
    if not first:
        raise DataError(f"{path.name}: empty file")
    if sep is None:
        suffix = (Path(path.stem) if path.suffix.lower() == ".gz" else path).suffix.lower()
        sep = default_sep or ("\t" if suffix in (".tsv", ".dat") else _sniff(first))
    src.sep = sep
    return src, _parse(src, header)


def _sniff(line: str) -> str:
    """Tab, else the more frequent of comma and semicolon, else whitespace."""
    if "\t" in line:
        return "\t"
    counts = {",": line.count(","), ";": line.count(";")}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else _WHITESPACE


def _parse(src: _Source, header: bool) -> pd.DataFrame:
    """Parse the data lines; blank lines are kept while parsing (row k is line k + first_line), then dropped."""
    frame = _read_csv(
        src,
        header=0 if header else None,
        skip_blank_lines=False,
        # The C parser is fast and names the line of a ragged row; it takes no multi-character sep.
        engine="c" if len(src.sep) == 1 or src.sep == _WHITESPACE else "python",
    )
    src.n_fields = frame.shape[1]
    blank = (frame == "").all(axis=1)
    src.blank_lines = int(blank.sum())
    frame = frame[~blank]
    if frame.empty:
        raise DataError(f"{src.name}: {'header only, ' if header else ''}no data rows")
    return frame


def _read_anime_zip(path: Path, notes: list[str]) -> tuple[_Source, pd.DataFrame, dict | None]:
    """The ratings member of a Case Recommender anime zip, and the titles when it has them."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
    except zipfile.BadZipFile:
        # The directory of a zip is at its end, so a truncated archive looks like no archive at all.
        raise DataError(f"{path.name}: not a zip archive, or a truncated one (no zip directory at its end)") from None
    ratings = next((m for m in members if m.endswith("anime_ratings.dat")), None)
    if ratings is None:
        raise DataError(f"{path.name}: no member ending in 'anime_ratings.dat'; members are {members}")
    # The .dat files are plain tab-separated text: a '"' in a title is a character, not a quote.
    opener = functools.partial(_open_member, path, ratings)
    src = _Source(f"{path.name}:{ratings}", 2, open_binary=opener, sep="\t", quoting=csv.QUOTE_NONE, notes=notes)
    frame = _parse(src, header=True)
    info = next((m for m in members if m.endswith("anime_info.dat")), None)
    titles = None
    if info is not None:
        opener = functools.partial(_open_member, path, info)
        info_src = _Source(f"{path.name}:{info}", 2, open_binary=opener, sep="\t", quoting=csv.QUOTE_NONE, notes=notes)
        titles = _titles_from(_read_csv(info_src), "anime_ids", "name") or {}
        # The titles come from MyAnimeList's HTML ("Gintama&#039;"); show them as text.
        titles = {k: html.unescape(v) for k, v in titles.items()}
    return src, frame, titles


def _read_titles(path: Path, notes: list[str]) -> dict | None:
    """MovieLens titles from the ``movies.csv`` beside the ratings, when there is one."""
    if not path.is_file():
        return None
    src = _Source(path.name, 2, open_binary=_binary_opener(path), notes=notes)
    return _titles_from(_read_csv(src), "movieId", "title")


def _titles_from(frame: pd.DataFrame, id_col: str, title_col: str) -> dict | None:
    """Raw id (text, stripped) -> title, or None when the columns are not there."""
    if id_col not in frame.columns or title_col not in frame.columns:
        return None
    return dict(zip(frame[id_col].str.strip(), frame[title_col], strict=True))


def _read_parquet(path: Path) -> tuple[_Source, pd.DataFrame]:
    """A Parquet file with its own dtypes (checked column by column later)."""
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
    """The column for ``role``: the given name or position, else a guess from the header."""
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
        raise DataError(f"{src.name}: no {role} column found; {shown}; name it with {flag}{_sep_hint(frame, src)}")
    if isinstance(given, int) or (not header and str(given).isdigit()):
        if 0 <= int(given) < len(columns):
            return columns[int(given)]
    elif given in columns:
        return given
    else:
        folded = [c for c in columns if str(c).strip().lower() == str(given).strip().lower()]
        if len(folded) == 1:
            return folded[0]
    raise DataError(
        f"{src.name}: {role} column {given!r} not found; {shown}; set it with {flag}{_sep_hint(frame, src)}"
    )


def _sep_hint(frame: pd.DataFrame, src: _Source) -> str:
    """When a text file parsed as one column, the separator its first line seems to use."""
    if frame.shape[1] != 1 or src.open_binary is None:
        return ""
    text = f"{frame.columns[0]}{frame.iloc[0, 0]}"
    for sep in ("::", "\t", ",", ";", "|"):
        if sep in text and sep != src.sep:
            return f" (read as one column with separator {src.sep!r}, but the file contains {sep!r}: try sep={sep!r})"
    return ""
