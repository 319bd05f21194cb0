"""The estimator registry: every backward rule for a discrete forward map has a name."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pvtune.registry import Registry

EstimatorFn = Callable[..., Tensor]

ESTIMATORS: Registry[str, EstimatorFn] = Registry("estimator")


def register_estimator(
    name: str, *, overwrite: bool = False
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator that makes an estimator function available as ``get_estimator(name)``.

    User code can add estimators this way without editing pvtune::

        @register_estimator("my_sign")
        def my_sign(x):
            return MySignFunction.apply(x)
    """
    return ESTIMATORS.decorator(name, overwrite=overwrite)


def get_estimator(name: str) -> EstimatorFn:
    """The estimator function registered under ``name`` (KeyError lists the known names)."""
    return ESTIMATORS.get(name)


def list_estimators() -> list[str]:
    """Names of every registered estimator."""
    return ESTIMATORS.names()
