"""Logging helpers: flattened params and metrics, per-epoch history, MACs, config, CSV tables, figures, and
everything one trained + evaluated task produces (`log_task_result`)."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from dynadapter.tracking.connection import RunRef
from dynadapter.tracking.tags import BATCH_LIMIT, MAX_PARAM_LENGTH


def plain_value(obj: Any) -> Any:
    """Pydantic models and dataclasses as plain JSON-like data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return obj


def config_tree(config: Any, sections: Sequence[str] | None) -> dict[str, Any]:
    tree = plain_value(config)
    if not isinstance(tree, Mapping):
        raise TypeError(f"config must be a Params, a dataclass or a mapping, got {type(config).__name__}")
    return {k: v for k, v in tree.items() if sections is None or k in sections}


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"base.backbone.name": "vit_tiny...", "train.priority.start": "[1.0, 0.5]"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        value = plain_value(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def log_params(run: RunRef, params: Mapping[str, Any], *, prefix: str = "", strict: bool = True) -> dict[str, str]:
    """Log flattened params, skipping those already logged with the same value (so re-runs are no-ops).

    A key already logged with another value raises (strict) or is warned about and kept: MLflow params
    cannot change. Returns what was newly logged.
    """
    from mlflow.entities import Param

    flat = flatten_params(params, prefix)
    existing = run.client.get_run(run.run_id).data.params
    conflicts = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
    if conflicts:
        detail = ", ".join(f"{k}: logged {existing[k]!r}, now {flat[k]!r}" for k in conflicts[:10])
        if strict:
            raise ValueError(f"run {run.run_id}: params cannot change in MLflow ({detail})")
        warnings.warn(f"run {run.run_id}: keeping the params first logged ({detail})", stacklevel=2)
    new = {k: v for k, v in flat.items() if k not in existing}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):  # MLflow's limit on params per batch
        run.client.log_batch(run.run_id, params=items[i : i + 100])
    return new


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return float(value.item())
    return None


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"test_accuracy": 0.9, "test_exit_fraction_0": 0.4}; non-numbers are skipped."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{name}_"))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if (x := _numeric(v)) is not None:
                    flat[f"{name}_{i}"] = x
        elif (x := _numeric(value)) is not None:
            flat[name] = x
    return flat


def _log_metric_batch(run: RunRef, metrics: Iterable[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v, step in metrics]
    for i in range(0, len(items), BATCH_LIMIT):
        run.client.log_batch(run.run_id, metrics=items[i : i + BATCH_LIMIT])


def log_metrics(run: RunRef, metrics: Mapping[str, Any], *, step: int = 0, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) mapping as metrics at `step`; lists become `<key>_<i>`."""
    flat = flatten_numbers(metrics, prefix)
    _log_metric_batch(run, ((k, v, step) for k, v in flat.items()))
    return flat


BUDGET_CURVE_METRICS = {"val_accuracy": "val_accuracy", "test_accuracy": "test_accuracy",
                        "test_fraction": "macs_fraction", "val_fraction": "val_macs_fraction"}


def log_budget_curve(run: RunRef, rows: Sequence[Mapping[str, Any]], *, prefix: str = "budget_curve/") -> int:
    """The val-calibrated budget curve as metrics with step = budget in percent: `budget_curve/test_accuracy`,
    `/val_accuracy`, `/macs_fraction` (test MACs over full depth), `/val_macs_fraction`. MLflow's own charts
    then draw accuracy against budget (x = step) or against MACs (x = the macs_fraction metric) and overlay
    runs. `rows`: dicts with `budget` (a fraction) and any of the keys of `BUDGET_CURVE_METRICS`."""
    items = [(prefix + name, float(row[key]), int(round(float(row["budget"]) * 100)))
             for row in rows for key, name in BUDGET_CURVE_METRICS.items() if row.get(key) is not None]
    _log_metric_batch(run, items)
    return len(items)


def log_history(run: RunRef, history: Sequence[Mapping[str, Any]], *, prefix: str = "") -> int:
    """Per-epoch training metrics (train.fit's history) with step = epoch, so MLflow draws curves."""
    from dynadapter.train import flatten_metrics

    rows = []
    for i, entry in enumerate(history):
        step = int(entry.get("epoch", i + 1))
        flat = flatten_metrics({k: v for k, v in entry.items() if k != "epoch"})
        rows += [(f"{prefix}{k}", v, step) for k, v in flat.items()]
    _log_metric_batch(run, rows)
    return len(rows)


def log_exit_accuracies(run: RunRef, accuracies: Sequence[float], *, split: str = "test") -> None:
    """Accuracy of each exit alone (static truncation there): `<split>_acc_exit_<i>`."""
    log_metrics(run, {f"{split}_acc_exit_{i}": float(a) for i, a in enumerate(accuracies)})


def log_macs(run: RunRef, costs: Any) -> None:
    """Per-image MACs per piece (embed, stage_i, head_i, cumulative_i, full, full-depth baseline) as metrics,
    and the stage costs as `stage_costs.json`."""
    d = costs.to_dict() if hasattr(costs, "to_dict") else dict(costs)
    log_metrics(run, {k: v for k, v in d.items() if k != "exits"}, prefix="macs_")
    run.client.log_dict(run.run_id, d, "stage_costs.json")


def log_config(run: RunRef, config: Any, artifact_file: str = "config/resolved.yaml") -> None:
    """The resolved config as YAML (artifacts can be replaced, unlike params)."""
    tree = config_tree(config, None)
    run.client.log_text(run.run_id, yaml.safe_dump(tree, sort_keys=False), artifact_file)


def log_table(run: RunRef, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    """Rows of dicts as a CSV artifact (lists as JSON), e.g. the Pareto frontier."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or ["empty"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple, Mapping)) else v for k, v in row.items()})
    run.client.log_text(run.run_id, buf.getvalue(), artifact_file)


def log_figure(run: RunRef, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure, or an existing PNG file, as an image artifact at `artifact_file`."""
    if not isinstance(figure, (str, Path)):
        run.client.log_figure(run.run_id, figure, artifact_file)
        return
    target = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:  # log_artifact keeps the local file name: copy to the target's
        local = Path(tmp) / target.name
        local.write_bytes(Path(figure).read_bytes())
        run.client.log_artifact(run.run_id, str(local), str(target.parent) if str(target.parent) != "." else None)


def pareto_figure(curve: Sequence[Mapping[str, Any]], title: str = ""):
    """Test accuracy vs MACs fraction of the val-calibrated sweep, the val-Pareto points highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p["test_fraction"] for p in curve], [p["test_accuracy"] for p in curve], s=8, alpha=0.4,
               label="sweep (test)")
    front = sorted((p for p in curve if p.get("val_pareto")), key=lambda p: p["test_fraction"])
    ax.plot([p["test_fraction"] for p in front], [p["test_accuracy"] for p in front], "o-",
            label="val Pareto points (test)")
    ax.set_xlabel("MACs / full-depth MACs")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy vs inference cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_task_result(run: RunRef, result: Any, *, plots: bool = True) -> dict[str, float]:
    """Everything a trained + evaluated task produces (`TaskResult` or its `to_dict()`, or a `Trained` /
    `Evaluated` alone): per-epoch history, parameter counts, per-exit and dynamic accuracies, MACs,
    calibration, throughput as metrics; result.json, curve.csv, pareto.csv and pareto.png as artifacts.
    Returns the scalar metrics logged."""
    d = result.to_dict() if hasattr(result, "to_dict") else plain_value(result)
    client = run.client
    if d.get("method") is not None:  # the task is already the run's dynadapter.task tag
        client.set_tag(run.run_id, "dynadapter.method", str(d["method"]))
    if d.get("history"):
        log_history(run, d["history"])
    scalars: dict[str, Any] = {}
    if "params" in d:
        scalars["params"] = d["params"]
    for key in ("best_epoch", "train_seconds", "step_seconds", "full_depth_macs"):
        if d.get(key) is not None:
            scalars[key] = d[key]
    if d.get("calibration"):
        cal = d["calibration"]
        scalars.update(val_accuracy=cal["val_accuracy"], val_macs=cal["val_macs"], val_fraction=cal["fraction"],
                       budget=cal["budget_fraction"], budget_feasible=cal["feasible"],
                       threshold=cal["thresholds"])
    if d.get("test"):
        t = d["test"]
        scalars.update(test_accuracy=t["accuracy"], test_macs=t["macs"], test_fraction=t["fraction"],
                       test_exit_fraction=t["exit_fraction"])
    if d.get("throughput"):
        scalars["throughput"] = d["throughput"]
    logged = log_metrics(run, scalars)
    if d.get("test_exit_accuracy"):
        log_exit_accuracies(run, d["test_exit_accuracy"])
    if d.get("stage_macs"):
        log_macs(run, d["stage_macs"])
    client.log_dict(run.run_id, {k: v for k, v in d.items() if k != "history"}, "result.json")
    curve = d.get("curve") or []
    if curve:
        log_table(run, curve, "curve.csv")
        log_table(run, [p for p in curve if p.get("val_pareto")], "pareto.csv")
        if plots:
            import matplotlib.pyplot as plt

            fig = pareto_figure(curve, f"{d.get('task', '')} {d.get('method', '')}".strip())
            try:
                log_figure(run, fig, "pareto.png")
            finally:
                plt.close(fig)
    return logged
