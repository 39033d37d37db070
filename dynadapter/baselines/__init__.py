"""Rival methods measured against Dyn-Adapter on the same backbone, data and trainer (bench/peers.py)."""

from dynadapter.baselines.dyt import (
    DispatchedMLP,
    DyTCosts,
    DyTObjective,
    activation_rate,
    build_dyt,
    measure_dyt_costs,
    predict_dyt,
)

__all__ = [
    "DispatchedMLP",
    "DyTCosts",
    "DyTObjective",
    "activation_rate",
    "build_dyt",
    "measure_dyt_costs",
    "predict_dyt",
]
