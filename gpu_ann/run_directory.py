"""A run directory appears whole: the first checkpoint is written beside it and renamed into place.

A run's first checkpoint is several files (``data.npz``, ``model.pt``, ``config.toml``, ``metrics.jsonl``,
``curves.png``, ``last.pt``). Each is atomic on its own (:func:`gpu_ann.checkpoint.atomic_write`); this module
makes the set atomic. The files are written into a hidden sibling, ``.NAME.partial-XXXXXXXX``, which then
takes the run directory's place in one rename. A process killed at any point leaves no run directory (or
the earlier run in it, untouched) or the complete new one, which ``gpu-ann train --resume`` continues.

An existing ``--out`` is handled so that training never deletes a file that no run wrote:

- missing or empty: the staged directory is renamed onto it;
- holding only what a run writes (an earlier run): the new run replaces it as a whole at its first
  checkpoint, in one exchange of the two directories (Linux ``renameat2``), and until then the earlier run
  stays as it was (``--resume`` still continues it). Where the system cannot exchange directories, the
  earlier run is first renamed to ``.NAME.replaced-XXXXXXXX``: a kill between that rename and the next one
  leaves no run directory, and the earlier run whole under that name;
- holding anything else, a file, a symbolic link, or the current directory (or one above it, which a
  rename cannot replace): refused before training starts, naming what is in the way.

Staging and set-aside directories left by a killed process are deleted by the next run into the same
``--out``, at its first checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpu_ann.checkpoint import CONFIG_FILE, DATA_FILE, MODEL_FILE, STATE_FILE, CheckpointError
from gpu_ann.run_log import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR

log = logging.getLogger("gpu_ann.training")

RUN_ENTRIES = frozenset({DATA_FILE, MODEL_FILE, STATE_FILE, CONFIG_FILE, METRICS_FILE, CURVES_FILE, TENSORBOARD_DIR})
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def check_output_directory(run_dir: Path) -> None:
    """Refuse an output path a new run could not replace: a file, a link, or a directory with foreign files.

    Parameters
    ----------
    run_dir : Path
        The run's ``--out``; it may not exist yet.

    Raises
    ------
    CheckpointError
        ``run_dir`` is not a directory, is a symbolic link, holds the current directory, or holds entries
        other than a run's files (and temporary files of a killed writer); the message lists them.
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise CheckpointError(f"{run_dir}: --out is a symbolic link; give the directory it points to")
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise CheckpointError(
            f"{run_dir}: --out is the current directory or one above it; a new run replaces its --out as a whole, "
            "so give a directory below it, such as runs/NAME"
        )
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: --out exists and is not a directory")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not _is_temporary(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(
            f"{run_dir}: holds {shown}, which a training run does not write; a new run replaces its --out "
            "directory as a whole, so give a new or empty --out, move those files, or continue the run there "
            "with --resume"
        )


@contextlib.contextmanager
def staged_run_directory(run_dir: Path) -> Iterator[Path]:
    """An empty directory beside ``run_dir`` to write a first checkpoint into; it becomes ``run_dir`` on exit.

    On an exception the staging directory is deleted and ``run_dir`` is left as it was.

    Parameters
    ----------
    run_dir : Path
        The run directory to create, or an earlier run's to replace (see the module docstring).

    Yields
    ------
    Path
        The staging directory.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_staging(run_dir):
        log.info("removing %s, left by an interrupted first checkpoint", stale)
        shutil.rmtree(stale)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.partial-", dir=run_dir.parent))
    try:
        # mkdtemp makes the directory private (0700); give it the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        _publish(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, run_dir: Path) -> None:
    """Put the complete ``staging`` in ``run_dir``'s place, replacing an earlier run's directory."""
    try:
        os.replace(staging, run_dir)  # no run directory yet, or an empty one: one rename
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    check_output_directory(run_dir)  # checked when the run started; files may have appeared since
    if _exchange(staging, run_dir):
        shutil.rmtree(staging)  # now the earlier run
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.replaced-", dir=run_dir.parent))
    os.replace(run_dir, aside)  # onto an empty directory: one rename
    try:
        os.replace(staging, run_dir)
    except BaseException:
        os.replace(aside, run_dir)  # the earlier run back in its place
        raise
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an older kernel, or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or None off Linux or without it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _stale_staging(run_dir: Path) -> list[Path]:
    """Staging and set-aside directories of ``run_dir`` that a killed process left beside it."""
    name = glob.escape(run_dir.name)
    found = [*run_dir.parent.glob(f".{name}.partial-*"), *run_dir.parent.glob(f".{name}.replaced-*")]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


def _is_temporary(name: str) -> bool:
    """A temporary file of :func:`gpu_ann.checkpoint.atomic_write` (``.NAME.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")
