"""The dynamic model as an MLflow pyfunc (`dynadapter.serving.DynAdapterPyfunc`): its signature, pinned pip
requirements, and logging it under a run."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dynadapter.tracking.connection import RunRef, global_tracking_uri
from dynadapter.tracking.tags import TAG_MODEL_URI, TAG_TASK


def _pip_requirements() -> list[str]:
    """Pinned to what runs here (local version labels like +cpu dropped: PyPI cannot resolve them); given
    explicitly because MLflow's inference of them loads the model in a subprocess, slowly."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pydantic", "pyyaml"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def dynamic_model_signature(input_shape: Sequence[int]):
    """Input: float32 images [-1, C, H, W] in [0, 1]; output: prediction, exit_index, confidence, macs per
    image; params: `budget` (a MACs fraction, picks val-calibrated thresholds; `budget_confidence` certifies it
    at that probability), `max_drop` (+ `drop_confidence`: the cheapest thresholds whose accuracy drop against
    the last exit is certified within it) or `thresholds` (one per exit; empty = not given)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *map(int, input_shape)))])
    outputs = Schema([
        TensorSpec(np.dtype(np.int64), (-1,), "prediction"),
        TensorSpec(np.dtype(np.int64), (-1,), "exit_index"),
        TensorSpec(np.dtype(np.float32), (-1,), "confidence"),
        TensorSpec(np.dtype(np.int64), (-1,), "macs"),
    ])
    params = ParamSchema([
        ParamSpec("budget", "float", None),  # None: the thresholds calibrated at the model's own budget
        ParamSpec("thresholds", "float", [], shape=(-1,)),
        ParamSpec("budget_confidence", "float", None),  # certify `budget` at this probability (0, 1)
        ParamSpec("max_drop", "float", None),  # cheapest thresholds with accuracy drop <= max_drop vs the last exit
        ParamSpec("drop_confidence", "float", None),  # ... certified at this probability (default 0.9)
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)



def log_dynamic_model(
    run: RunRef,
    model,
    *,
    backbone_cfg,
    model_cfg,
    costs,
    curve: Iterable[Any],
    budget: float,
    name: str = "model",
    task: str | None = None,
    input_example: Any = None,
    ship_code: bool = True,
    path_stats: dict | None = None,
    certificate: dict | None = None,
):
    """Log `model` (merged, with its val-calibrated thresholds set, as `evaluate_task` leaves it) as an
    MLflow pyfunc of `dynadapter.serving.DynAdapterPyfunc` under `run`. Returns MLflow's `ModelInfo`; its
    `model_uri` is also tagged on the run (`model_uri_of`).

    `curve`: the validation sweep (`sweep`'s points or `Evaluated.curve`); only val-calibrated points and
    val figures are stored. `input_example`: the serving payload example (default: one grey image); MLflow
    checks that the logged model predicts on it. `ship_code`: copy the `dynadapter` package into the model,
    so that a serving environment (`mlflow models serve`) needs only the pinned pip requirements.
    `path_stats` (Evaluated.path_stats): lets the served model certify a budget or an accuracy drop per request.
    `certificate`: what the default thresholds promise (target, confidence, certified bound); also in the MLmodel
    metadata (`dynadapter_certificate`).
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model

    import dynadapter
    from dynadapter.serving import ARTIFACT_KEY, save_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_bundle(model, Path(tmp) / ARTIFACT_KEY, backbone_cfg=backbone_cfg, model_cfg=model_cfg,
                             costs=costs, curve=curve, budget=budget, task=task, path_stats=path_stats,
                             certificate=certificate)
        config = json.loads((bundle / "config.json").read_text())
        # created here, not by Model.log: it would file the model under the fluent API's active experiment
        logged = run.client.create_logged_model(run.experiment_id, name=name, source_run_id=run.run_id,
                                                tags={TAG_TASK: task} if task else None)
        with global_tracking_uri(run.tracking_uri):
            info = Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run.run_id,
                python_model=str(Path(dynadapter.__file__).parent / "serving_model.py"),  # code, not a pickle
                artifacts={ARTIFACT_KEY: str(bundle)},
                signature=dynamic_model_signature(config["input_shape"]),
                input_example=input_example if input_example is not None else np.full(
                    (1, *config["input_shape"]), 0.5, dtype=np.float32),
                pip_requirements=_pip_requirements(),
                code_paths=[str(Path(dynadapter.__file__).parent)] if ship_code else None,
                model_id=logged.model_id,
                metadata={"dynadapter_certificate": certificate} if certificate else None,
            )
    run.client.set_tag(run.run_id, TAG_MODEL_URI, info.model_uri)
    return info
