"""One progress bar for long work (training, evaluating a test set, a reproduction's ratio loop).

Bars go to stderr, so stdout keeps only results (one JSON object under ``--json``); callers pass
``enabled=False`` for ``--quiet`` and ``--json``, and then nothing at all is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

#: ``advance(description=None, steps=1)``: move the bar on, optionally with a new description.
Advance = Callable[..., None]


@contextmanager
def progress_bar(enabled: bool, total: int, description: str = "") -> Iterator[Advance]:
    """A rich progress bar on stderr when ``enabled``, else a no-op; yields ``advance``."""
    if not enabled:
        yield lambda *_args, **_kwargs: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)

        def advance(description: str | None = None, steps: int = 1) -> None:
            bar.update(task, advance=steps, description=description)

        yield advance
