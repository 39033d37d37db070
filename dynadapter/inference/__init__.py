"""Inference: exact per-stage MACs, validation-only threshold calibration, Pareto frontier, throughput."""

from dynadapter.inference.calibrate import (
    MODES,
    NEVER,
    Calibration,
    CurvePoint,
    Evaluation,
    Simulation,
    calibrate,
    calibrate_drop,
    collect_exit_logits,
    compare_modes,
    curve_accuracy,
    evaluate_thresholds,
    simulate,
    sweep,
    validation_path_stats,
)
from dynadapter.inference.guarantee import PathStats
from dynadapter.inference.flops import (
    StageCosts,
    count_macs,
    dynamic_macs,
    measure_stage_costs,
    unfused_attention,
    vit_macs_closed_form,
)
from dynadapter.inference.pareto import pareto_front
from dynadapter.inference.runtime import (
    ThroughputComparison,
    compare_throughput,
    dynamic_vs_full,
    full_depth_forward,
    measure_throughput,
    run_dynamic,
)

__all__ = [
    "MODES",
    "NEVER",
    "Calibration",
    "PathStats",
    "calibrate_drop",
    "validation_path_stats",
    "compare_modes",
    "curve_accuracy",
    "CurvePoint",
    "Evaluation",
    "Simulation",
    "StageCosts",
    "ThroughputComparison",
    "compare_throughput",
    "calibrate",
    "collect_exit_logits",
    "count_macs",
    "dynamic_macs",
    "dynamic_vs_full",
    "evaluate_thresholds",
    "full_depth_forward",
    "measure_stage_costs",
    "measure_throughput",
    "pareto_front",
    "run_dynamic",
    "simulate",
    "sweep",
    "unfused_attention",
    "vit_macs_closed_form",
]
