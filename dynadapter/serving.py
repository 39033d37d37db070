"""The registered model: a self-contained bundle (weights, architecture, stage costs, val threshold curve) and
the MLflow pyfunc that serves it with compacted early exit, at a FLOPs budget or at explicit thresholds.

Importing this module touches no tracking server and starts no run; `DynamicPredictor` works without MLflow.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from dynadapter.config import BackboneConfig, ModelConfig
from dynadapter.inference.calibrate import ALWAYS  # every confidence reaches it: the image leaves there
from dynadapter.inference.flops import StageCosts
from dynadapter.inference.guarantee import PathStats
from dynadapter.models import DynAdapterViT, build_model, confidence_score, merge_petl, normalization
from dynadapter.models.petl import PetlModule

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
COSTS_FILE = "stage_costs.json"
CURVE_FILE = "threshold_curve.json"
PATH_FILE = "path_stats.json"  # val counts along the fixed threshold grid: per-request certified thresholds
ARTIFACT_KEY = "dynadapter_model"  # the pyfunc artifact holding the bundle directory
PIXEL_TOLERANCE = 1e-3  # float rounding of [0, 1] pixels, not a licence to send normalised images
CERTIFY_PARAMS = ("budget_confidence", "max_drop", "drop_confidence")  # pyfunc params -> DynamicPredictor.certify
PREDICT_BATCH = 256  # bounds peak memory for large requests; results do not depend on it


# ------------------------------------------------------------------------------------------- the bundle


def _curve_value(point: Any, *names: str) -> Any:
    for name in names:
        if isinstance(point, Mapping) and name in point:
            return point[name]
        if hasattr(point, name):
            return getattr(point, name)
    return None


def val_curve(curve: Iterable[Any]) -> list[dict[str, Any]]:
    """The val-calibrated points (one per budget) in the stored form, sorted by budget, test figures dropped.

    Accepts `sweep`'s `CurvePoint`s or `Evaluated.curve` rows. Only points produced by calibrating at a budget
    are kept (shared-threshold sweep points answer no budget), and nothing measured on test is stored, so
    choosing thresholds at predict time can never look at test data.
    """
    by_budget: dict[float, dict[str, Any]] = {}
    for p in curve:
        budget = _curve_value(p, "budget", "budget_fraction")
        if budget is None:
            continue
        by_budget[float(budget)] = {
            "budget": float(budget),
            "thresholds": [float(t) for t in _curve_value(p, "thresholds")],
            "val_accuracy": float(_curve_value(p, "val_accuracy", "accuracy")),
            "val_fraction": float(_curve_value(p, "val_fraction", "fraction")),
        }
    return [by_budget[b] for b in sorted(by_budget)]


def is_merged(model: DynAdapterViT) -> bool:
    """True when mergeable PETL branches were folded into the weights (the module tree then differs)."""
    petl = getattr(model, "petl", None)
    return bool(petl is not None and petl.mergeable and not any(isinstance(m, PetlModule) for m in model.modules()))


def save_bundle(
    model: DynAdapterViT,
    out_dir: str | Path,
    *,
    backbone_cfg: BackboneConfig,
    model_cfg: ModelConfig,
    costs: StageCosts,
    curve: Iterable[Any],
    budget: float,
    task: str | None = None,
    path_stats: Mapping[str, Any] | None = None,
    certificate: Mapping[str, Any] | None = None,
) -> Path:
    """Write everything that rebuilds and serves `model`, with no reference to files outside the bundle.

    The whole state dict is stored (backbone included): the registered model must not depend on the backbone
    checkpoint the pipeline happened to train on. `model.thresholds` are the defaults (calibrated on val at
    `budget`).
    """
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE))  # handles shared tensors; loaded back strictly
    mean, std = normalization(model.backbone)
    pe = model.backbone.patch_embed
    config = {
        "format": BUNDLE_FORMAT,
        "task": task,
        "backbone": {**backbone_cfg.model_dump(mode="json"), "checkpoint": None},
        "model": model_cfg.model_dump(mode="json"),
        "num_classes": int(model.num_classes),
        "merged": is_merged(model),
        "exits": list(model.exits),
        "confidence": model.confidence,
        "input_shape": [int(pe.proj.in_channels), *(int(s) for s in pe.img_size)],
        "mean": list(mean),
        "std": list(std),
        "default_budget": float(budget),
        "default_thresholds": [float(t) for t in model.thresholds.tolist()],
        "certificate": dict(certificate) if certificate else None,  # what the default thresholds promise
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (out / COSTS_FILE).write_text(json.dumps(costs.to_dict(), indent=2))
    (out / CURVE_FILE).write_text(json.dumps(val_curve(curve), indent=2))
    if path_stats is not None:
        (out / PATH_FILE).write_text(json.dumps(path_stats))
    return out


def load_bundle(path: str | Path, device: str | torch.device | None = None) -> DynamicPredictor:
    """Rebuild the model from its architecture config (timm, no download) and load the stored weights."""
    from safetensors.torch import load_model

    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: bundle format {config.get('format')!r}, this code reads {BUNDLE_FORMAT}")
    backbone_cfg = BackboneConfig.model_validate(config["backbone"])
    model_cfg = ModelConfig.model_validate(config["model"])
    model = build_model(backbone_cfg, model_cfg, int(config["num_classes"]))
    if config["merged"]:
        merge_petl(model)  # same module tree as the saved model
    if model.exits != config["exits"]:
        raise ValueError(f"{path}: config rebuilds exits {model.exits}, the bundle was saved with {config['exits']}")
    try:
        load_model(model, str(path / WEIGHTS_FILE), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path / WEIGHTS_FILE}: weights do not fit the rebuilt model: {err}") from err
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device).eval()
    costs = StageCosts.from_dict(json.loads((path / COSTS_FILE).read_text()))
    curve = json.loads((path / CURVE_FILE).read_text())
    stats = PathStats.from_dict(json.loads((path / PATH_FILE).read_text())) if (path / PATH_FILE).is_file() else None
    return DynamicPredictor(model, config, costs, curve, stats)


# ------------------------------------------------------------------------------------------ prediction


class DynamicPredictor:
    """Validated inputs in, per-image prediction / exit / confidence / MACs out (plain NumPy)."""

    def __init__(self, model: DynAdapterViT, config: Mapping[str, Any], costs: StageCosts,
                 curve: Sequence[Mapping[str, Any]], path_stats: PathStats | None = None):
        self.model = model
        self.path_stats = path_stats
        self.config = dict(config)
        self.costs = costs
        self.curve = sorted((dict(p) for p in curve), key=lambda p: p["budget"])
        self.input_shape = tuple(config["input_shape"])  # (C, H, W)
        self._mean = torch.tensor(config["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(config["std"], dtype=torch.float32).view(-1, 1, 1)

    @property
    def num_exits(self) -> int:
        return len(self.model.exits)

    @property
    def expected(self) -> str:
        return f"float32 images of shape (-1, {', '.join(map(str, self.input_shape))}) with values in [0, 1]"

    def check_images(self, images: Any) -> torch.Tensor:
        """Reject what would otherwise crash deep inside torch or silently mispredict, naming the contract."""
        if hasattr(images, "to_numpy") and not isinstance(images, torch.Tensor):  # a pandas frame
            images = images.to_numpy()
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.float32:  # before .numpy(), which cannot even convert bfloat16
                raise ValueError(f"expected {self.expected}; got dtype {images.dtype}")
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise ValueError(f"expected {self.expected}; got {type(images).__name__}")
        if images.dtype != np.float32:
            hint = " (divide uint8 pixels by 255)" if images.dtype == np.uint8 else ""
            raise ValueError(f"expected {self.expected}; got dtype {images.dtype}{hint}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected {self.expected}; got shape {tuple(images.shape)}")
        if images.size and not np.isfinite(images).all():
            raise ValueError(f"expected {self.expected}; got NaN or infinite values")
        if images.size and (images.min() < -PIXEL_TOLERANCE or images.max() > 1 + PIXEL_TOLERANCE):
            raise ValueError(
                f"expected {self.expected} (the model normalises with its own mean/std); got values in "
                f"[{images.min():.3g}, {images.max():.3g}]")
        return torch.from_numpy(np.ascontiguousarray(images))

    @property
    def cheapest_fraction(self) -> float:
        """The least any input can cost, as a fraction of full depth: every image leaving at the first exit
        (thresholds 0), whose head alone runs. No budget below it can be met."""
        first = self.costs.cumulative([ALWAYS] * self.num_exits)[0]
        return first / self.costs.full_depth_baseline()

    def thresholds_for_budget(self, budget: float) -> list[float]:
        """The val-calibrated thresholds of the largest stored budget at or below `budget`.

        Never above the request: that point's val MACs fraction is <= its own budget <= `budget`. A budget below
        every calibrated one but not below `cheapest_fraction` gets "every image leaves at the first exit"
        (thresholds 0), which costs exactly `cheapest_fraction` on any input, with a warning; a budget below
        `cheapest_fraction` cannot be met and is refused.
        """
        budget = self._checked_budget(budget)
        if self.num_exits == 1:
            return list(self.config["default_thresholds"])
        feasible = [p for p in self.curve if p["budget"] <= budget + 1e-6]  # a float32 0.45 is still 0.45
        if feasible:
            return list(feasible[-1]["thresholds"])
        floor = self.cheapest_fraction
        if budget + 1e-6 < floor:
            raise ValueError(f"budget {budget} is below what this model can spend: every image leaving at the first "
                             f"exit costs {floor:.3f} of full-depth MACs; pass a budget >= {floor:.3f}")
        smallest = min((p["budget"] for p in self.curve), default=None)
        warnings.warn(f"budget {budget} is below the smallest val-calibrated budget ({smallest}): every image "
                      f"leaves at the first exit ({floor:.3f} of full-depth MACs on any input)", stacklevel=2)
        return [ALWAYS] * self.num_exits

    @property
    def certificate(self) -> dict[str, Any] | None:
        """What the default thresholds promise on new data (target, confidence_level, certified bound)."""
        return self.config.get("certificate")

    def certify(self, budget: float | None = None, budget_confidence: float | None = None,
                max_drop: float | None = None, drop_confidence: float | None = None) -> dict[str, Any]:
        """Thresholds certified from the stored val counts (dynadapter.inference.guarantee), exactly as the
        evaluate stage certifies them: `budget` at `budget_confidence`, or the cheapest within `max_drop` at
        `drop_confidence` (default 0.9). Returns the thresholds with what they promise."""
        if self.path_stats is None:
            raise ValueError("this model stores no validation counts (logged before certified calibration); "
                             "pass budget or thresholds only")
        if max_drop is not None:
            if budget is not None or budget_confidence is not None:
                raise ValueError("pass either max_drop (with drop_confidence) or budget (with budget_confidence)")
            level = 0.9 if drop_confidence is None else float(drop_confidence)
            k, bound = self.path_stats.for_drop(float(max_drop), level)
            return {"thresholds": self.path_stats.thresholds[k].tolist(), "target": "accuracy_drop",
                    "max_drop": float(max_drop), "confidence_level": level, "bound": bound}
        if budget is None:
            raise ValueError("budget_confidence needs a budget")
        budget = self._checked_budget(budget)
        k, bound = self.path_stats.for_budget(budget, float(budget_confidence))
        if k is None:
            raise ValueError(f"budget {budget} cannot be certified at confidence {budget_confidence}: even every "
                             f"image leaving at the first exit is bounded at {bound:.3f} of full-depth MACs")
        return {"thresholds": self.path_stats.thresholds[k].tolist(), "target": "budget",
                "budget_fraction": budget, "confidence_level": float(budget_confidence), "bound": bound}

    @staticmethod
    def _checked_budget(budget: Any) -> float:
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite fraction of full-depth MACs > 0, got {budget!r}")
        return float(budget)

    def resolve_thresholds(self, budget: float | None = None, thresholds: Sequence[float] | None = None,
                           budget_confidence: float | None = None, max_drop: float | None = None,
                           drop_confidence: float | None = None) -> list[float]:
        """Explicit thresholds win; else certified ones (`budget_confidence` or `max_drop` given, see `certify`);
        else the budget's val-calibrated ones (calibrated as the evaluate stage was configured); else the
        defaults saved with the model."""
        if thresholds is not None and len(thresholds) > 0:
            if any(v is not None for v in (budget, budget_confidence, max_drop)):
                raise ValueError("pass either budget or thresholds, not both")
            th = [float(t) for t in thresholds]
            if len(th) != self.num_exits:
                raise ValueError(f"thresholds: need {self.num_exits} values (one per exit), got {len(th)}")
            if not all(math.isfinite(t) for t in th):
                raise ValueError(f"thresholds must be finite, got {th}")
            return th
        if budget_confidence is not None or max_drop is not None:
            return [float(t) for t in self.certify(budget, budget_confidence, max_drop, drop_confidence)["thresholds"]]
        if budget is not None:
            return self.thresholds_for_budget(float(budget))
        return list(self.config["default_thresholds"])

    @torch.no_grad()
    def predict(self, images: Any, budget: float | None = None, thresholds: Sequence[float] | None = None,
                **certified: float | None) -> dict[str, np.ndarray]:
        """`certified`: budget_confidence, max_drop, drop_confidence (see `resolve_thresholds`)."""
        x = self.check_images(images)
        th = torch.tensor(self.resolve_thresholds(budget, thresholds, **certified), dtype=torch.float32)
        cum = torch.tensor(self.costs.cumulative(th), dtype=torch.int64)  # skipped heads cost nothing
        device = next(self.model.parameters()).device
        outs: dict[str, list[torch.Tensor]] = {"prediction": [], "exit_index": [], "confidence": [], "macs": []}
        for i in range(0, x.shape[0], PREDICT_BATCH):
            chunk = ((x[i : i + PREDICT_BATCH] - self._mean) / self._std).to(device)
            out = self.model.forward_dynamic(chunk, th)
            exit_index = out.exit_index.cpu()
            outs["prediction"].append(out.preds.cpu())
            outs["exit_index"].append(exit_index)
            outs["confidence"].append(confidence_score(out.logits, self.model.confidence).cpu())
            outs["macs"].append(cum[exit_index])
        empty = {"prediction": torch.long, "exit_index": torch.long, "confidence": torch.float32, "macs": torch.long}
        return {k: (torch.cat(v) if v else torch.zeros(0, dtype=empty[k])).numpy() for k, v in outs.items()}


class DynAdapterPyfunc(PythonModel):
    """MLflow pyfunc: `predict(images, params={"budget": 0.4})`, `{"budget": 0.4, "budget_confidence": 0.95}`,
    `{"max_drop": 0.02}` or `{"thresholds": [...]}`."""

    def load_context(self, context) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = load_bundle(context.artifacts[ARTIFACT_KEY], device=device)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        # np.ndarray: MLflow infers no schema from it and validates against the logged signature instead
        params = params or {}
        try:
            return self.predictor.predict(model_input, budget=params.get("budget"),
                                          thresholds=params.get("thresholds"),
                                          **{k: params.get(k) for k in CERTIFY_PARAMS})
        except ValueError as err:
            # MLflow's own exception keeps the reason: the scoring server answers 400 with it in `message`
            # (any other exception becomes "Encountered an unexpected error", the reason buried in a trace)
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(err)) from err
