"""The engine: every variant in one data pass (DESIGN.md §7). See `Evaluator`."""

from layerfast.engine.evaluator import EvalResult, Evaluator
from layerfast.engine.naive import naive_evaluate

__all__ = ["EvalResult", "Evaluator", "naive_evaluate"]
