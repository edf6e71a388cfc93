"""Review of the s18 changes: defects the day's commits introduced or left in the cases they
name (a notebook's progress widget, a truncated safetensors file, a symlink to a class
folder's parent)."""

from __future__ import annotations

import importlib
import sys


def test_progress_bar_leaves_a_real_notebook_widget_its_refresh(monkeypatch) -> None:
    """In Jupyter, tqdm.auto's class is `class tqdm(notebook_tqdm, asyncio_tqdm)` defined in
    tqdm.auto itself, so its `__module__` is 'tqdm.auto', never 'tqdm.notebook': the widget
    was slowed to one redraw per 30 s (errors.progress_bar). Built here by tqdm's own code."""
    import inspect

    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    from layerfast import errors

    class Widget(tqdm.std.tqdm):  # tqdm.notebook's class needs ipywidgets
        pass

    Widget.__module__ = "tqdm.notebook"

    class Stderr:
        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False  # a kernel's stderr is no terminal

    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.setattr(tqdm.autonotebook, "tqdm", Widget)
    try:
        importlib.reload(tqdm.auto)  # as imported in a notebook: subclasses the widget
        assert tqdm.auto.tqdm.__module__ == "tqdm.auto"
        default = inspect.signature(tqdm.std.tqdm.__init__).parameters["mininterval"].default
        bar = errors.progress_bar(auto=True, total=10)
        assert isinstance(bar, Widget)
        assert bar.mininterval == default
    finally:
        monkeypatch.undo()
        importlib.reload(tqdm.auto)
