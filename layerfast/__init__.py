"""layerfast: which layers of a trained network matter, every variant in one data pass.

`layerfast.analyze(...)` runs a whole study (DESIGN.md §5); `layerfast.Evaluator` evaluates
arbitrary weight variants of any `nn.Module` on any iterable of batches.
"""

from __future__ import annotations

from layerfast import _ext  # noqa: F401  (fails with a clear message if the extension is missing)
from layerfast.errors import LayerfastError

__version__ = "0.1.0"
__all__ = ["LayerfastError", "Evaluator", "analyze", "__version__"]


def __getattr__(name: str):
    # Lazy: `import layerfast` stays cheap for `layerfast info` and the ops tests.
    if name == "Evaluator":
        from layerfast.engine import Evaluator

        return Evaluator
    if name == "analyze":
        from layerfast.analysis import analyze

        return analyze
    raise AttributeError(f"module 'layerfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too: `dir(layerfast)` (and tab completion) listed neither `analyze` nor
    `Evaluator` until they were first used."""
    return sorted({*globals(), *__all__})
