"""Progress for the long stages: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

log = logging.getLogger("gpu_ann")


def on_terminal() -> bool:
    """Whether stderr is a terminal, i.e. whether progress is drawn as bars rather than logged."""
    return sys.stderr.isatty()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one stage (reading, splitting, building the matrix...) as a context manager.

    On a terminal: a one-step bar that shows the elapsed time when done. Otherwise: "name ..." and
    "name: done in X s" log lines (INFO, logger ``gpu_ann``); the second is not written when the
    stage raises.

    Parameters
    ----------
    name : str
        What the stage does, as shown to the user.
    """
    started = time.perf_counter()
    if on_terminal():
        with tqdm(total=1, desc=name, bar_format="{desc}: {elapsed} {postfix}", leave=True) as bar:
            yield
            bar.update()
    else:
        log.info("%s ...", name)
        yield
        log.info("%s: done in %.1f s", name, time.perf_counter() - started)
