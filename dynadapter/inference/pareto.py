"""The accuracy-cost Pareto frontier: points no other point beats on both cost (lower) and accuracy (higher)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def _cost(p) -> float:
    return float(p[0]) if isinstance(p, (tuple, list)) else float(p.macs)


def _accuracy(p) -> float:
    return float(p[1]) if isinstance(p, (tuple, list)) else float(p.accuracy)


def pareto_front(
    points: Iterable[T],
    cost: Callable[[T], float] = _cost,
    accuracy: Callable[[T], float] = _accuracy,
) -> list[T]:
    """Non-dominated points, sorted by increasing cost (and so strictly increasing accuracy).

    A point is dropped if another costs no more and is at least as accurate, and differs in one of the two.
    Among exact ties (same cost, same accuracy) the first one given is kept. Points are `(cost, accuracy,
    ...)` tuples or objects with `.macs` and `.accuracy` (e.g. `CurvePoint`); other shapes: pass `cost` and
    `accuracy` key functions.
    """
    ordered = sorted(points, key=lambda p: (cost(p), -accuracy(p)))  # stable: first of a tie stays first
    front: list[T] = []
    best = float("-inf")
    for p in ordered:
        if accuracy(p) > best:
            front.append(p)
            best = accuracy(p)
    return front
