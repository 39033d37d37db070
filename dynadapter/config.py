"""Typed configuration for every pipeline stage, validated from `params.yaml` (+ CLI overrides).

One pydantic model per `params.yaml` section. Unknown keys, wrong types and out-of-range values are rejected
before any work starts, with the dotted key path and the offending value in the message.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params.yaml / override problem; the message names the key path and the bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------- base


class PathsConfig(Section):
    data: str = Field("data/prepared", description="Prepared Parquet datasets, one folder per task.")
    models: str = Field("models", description="Trained backbones and adapted models.")
    outputs: str = Field("outputs", description="Metrics, plots and resolved configs per stage.")


class BackboneConfig(Section):
    name: str = Field(
        "vit_convstem",
        description="timm VisionTransformer name; `overrides` adjust its architecture (img_size, depth, ...).",
    )
    checkpoint: str | None = Field(
        None,
        description="Local weights file (.pth, .npz or .safetensors). None: the embedded default backbone "
        "(shipped in weights/, or pretrained by the pretrain stage on procedural scenes).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=lambda: {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2},
        description="Keyword arguments passed to timm.create_model (architecture only).",
    )

    @property
    def img_size(self) -> int:
        size = self.overrides.get("img_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)


class AdapterConfig(Section):
    dim: int = Field(8, gt=0, description="Bottleneck width d of the AdaptFormer adapter.")
    scale: float = Field(1.0, gt=0, description="Output scale s of the adapter branch.")


class LoRAConfig(Section):
    rank: int = Field(4, gt=0, description="Rank r of the low-rank update on the fused qkv projection.")
    alpha: float = Field(4.0, gt=0, description="LoRA scaling numerator (update scaled by alpha / rank).")


class RepAdapterConfig(Section):
    dim: int = Field(8, gt=0, description="Bottleneck width of the linear Rep-Adapter (merged after training).")
    scale: float = Field(1.0, gt=0, description="Scale of the Rep-Adapter branch.")


PetlMethod = Literal["adapter", "lora", "rep_adapter", "linear_probe", "full_finetune"]


class PetlConfig(Section):
    method: PetlMethod = Field(
        "adapter",
        description="adapter | lora | rep_adapter; baselines: linear_probe (heads only), full_finetune.",
    )
    adapter: AdapterConfig = AdapterConfig()
    lora: LoRAConfig = LoRAConfig()
    rep_adapter: RepAdapterConfig = RepAdapterConfig()


class HeadsConfig(Section):
    hidden: list[int] | None = Field(
        None,
        description="Hidden width per exit head (0 = LN + Linear). None: balanced default, heavier heads early "
        "(2*D, D, D/2, then 0 for the last exit).",
    )
    balanced: bool = Field(True, description="False: every head is the light LN + Linear head (ablation).")
    width: float = Field(
        1.0, gt=0, le=4, description="Scales the balanced default's hidden widths (1.0: 2*D, D, D/2; 0.25: D/2, "
        "D/4, D/8): fewer trainable parameters in the heads. Not read when `hidden` is given.")

    @field_validator("hidden")
    @classmethod
    def _non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(h < 0 for h in v):
            raise ValueError(f"head widths must be >= 0, got {v}")
        return v


class ModelConfig(Section):
    petl: PetlConfig = PetlConfig()
    exits: list[int] | None = Field(
        None, description="Blocks (1-based) after which an exit head sits. None: every depth/4 blocks."
    )
    early_exit: bool = Field(True, description="False: a single head after the last block (full-depth baseline).")
    heads: HeadsConfig = HeadsConfig()
    confidence: Literal["max_softmax", "entropy"] = Field(
        "max_softmax", description="Exit criterion at inference."
    )

    @field_validator("exits")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("exits must name at least one block")
            if any(b < 1 for b in v) or any(b2 <= b1 for b1, b2 in zip(v, v[1:])):
                raise ValueError(f"exits must be strictly increasing block numbers >= 1, got {v}")
        return v


class MlflowConfig(Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite file or server).")
    experiment: str = Field("dynadapter", description="MLflow experiment name.")


class BaseSection(Section):
    seed: int = Field(0, ge=0, description="Global seed; the same seed gives the same data and models.")
    paths: PathsConfig = PathsConfig()
    tasks: list[str] = Field(
        default_factory=lambda: ["count", "position", "orientation", "digits", "glyphs", "textures"],
        description="Downstream tasks the train/evaluate stages use (folder names under paths.data).",
    )
    backbone: BackboneConfig = BackboneConfig()
    model: ModelConfig = ModelConfig()
    budget: float = Field(0.5, gt=0, le=1, description="Inference FLOPs budget as a fraction of full depth.")
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _exits_within_depth(self) -> BaseSection:
        depth = self.backbone.overrides.get("depth")
        exits = self.model.exits
        if depth is not None and exits is not None and exits[-1] > int(depth):
            raise ValueError(f"model.exits {exits} go beyond the backbone depth {depth}")
        return self


# ------------------------------------------------------------------------------------------------ prepare


class EmbeddedDataConfig(Section):
    image_size: int = Field(32, ge=16, le=512, description="Side of the generated square images.")
    train: int = Field(800, gt=0, description="Training images per downstream task (VTAB-1k: 800).")
    val: int = Field(200, gt=0, description="Validation images per downstream task (VTAB-1k: 200).")
    test: int = Field(1000, gt=0, description="Test images per downstream task.")


class PrepareConfig(Section):
    source: Literal["embedded", "vtab"] = Field(
        "embedded", description="embedded: generate the offline suite; vtab: import a VTAB-1k folder."
    )
    vtab_root: str | None = Field(None, description="VTAB-1k root folder (contains one folder per task).")
    on_bad_line: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad list line; skip: drop bad lines and report them."
    )
    num_classes: dict[str, int] = Field(
        default_factory=dict,
        description="Class count per task (any folder spelling), overriding the VTAB table or, for another "
        "task, the count inferred from train800 (labels must then be 0..K-1, each class in train800).",
    )
    embedded: EmbeddedDataConfig = EmbeddedDataConfig()

    @field_validator("num_classes")
    @classmethod
    def _positive_counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"class counts must be >= 1, got {bad}")
        return v

    @model_validator(mode="after")
    def _vtab_needs_root(self) -> PrepareConfig:
        if self.source == "vtab" and not self.vtab_root:
            raise ValueError("source 'vtab' needs vtab_root")
        return self


# ----------------------------------------------------------------------------------------- train / pretrain


class OptimConfig(Section):
    epochs: int = Field(20, gt=0, description="Training epochs.")
    batch_size: int = Field(64, gt=0, description="Batch size (per worker).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up length before the cosine decay.")


class PretrainConfig(OptimConfig):
    source: Literal["shipped", "train"] = Field(
        "shipped", description="shipped: use the backbone weights shipped in weights/ (checked against their "
        "recorded sha256; built by `make backbone` with this section); train: pretrain here (about 30 minutes "
        "on 2 CPU cores with the defaults). Ignored when base.backbone.checkpoint is set.")
    scenes: int = Field(50000, gt=0, description="Generated multi-factor training scenes (dynadapter.data.upstream).")
    val_scenes: int = Field(2000, gt=0, description="Held-out scenes for the per-factor val accuracy.")
    epochs: int = Field(24, gt=0, description="Upstream pretraining epochs.")
    batch_size: int = Field(128, gt=0, description="Batch size.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")


PriorityPattern = Literal["flat", "shallow_first", "deep_first"]


class PriorityConfig(Section):
    pattern: PriorityPattern = Field(
        "shallow_first",
        description="Shape of the per-exit loss weights when start/end are not given. shallow_first: shallow "
        "exits weigh 1+strength at the start and decline to 1-strength while deep exits rise the other way "
        "(the paper's 'progressively increase / gradually decline'); deep_first: the reverse; flat: all 1.")
    strength: float = Field(0.5, ge=0, lt=1, description="How far the pattern's weights move away from 1.")
    start: list[float] | None = Field(
        None, description="Per-exit loss weight at the start of training (overrides `pattern`). None: pattern."
    )
    end: list[float] | None = Field(None, description="Per-exit loss weight at the end of training (overrides "
                                    "`pattern`). None: pattern.")
    shape: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="How weights move from start to end over training (constant: start only)."
    )

    @field_validator("start", "end")
    @classmethod
    def _non_negative(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(w < 0 for w in v):
            raise ValueError(f"loss weights must be >= 0, got {v}")
        return v


class SparsityConfig(Section):
    forward: bool = Field(True, description="Depth-decaying dropout in PETL modules and heads.")
    p_max: float = Field(0.2, ge=0, lt=1, description="Dropout rate at the first stage.")
    p_min: float = Field(0.0, ge=0, lt=1, description="Dropout rate at the last stage.")
    backward: bool = Field(True, description="Random masking of trainable gradients each step.")
    q: float = Field(0.1, ge=0, lt=1, description="Fraction of trainable gradient entries zeroed each step.")
    dropout_stream: Literal["batch", "global"] = Field(
        "batch", description="Where training dropout draws its masks. batch: from (seed, step) for the global "
        "batch, each data-parallel rank keeping its rows, so W workers train what 1 worker trains and a resume "
        "needs no random state (docs/distributed.md). global: torch's process-wide generator (runs before this "
        "knob existed; ranks then drop different samples than 1 worker would).")

    @model_validator(mode="after")
    def _ordered(self) -> SparsityConfig:
        if self.p_min > self.p_max:
            raise ValueError(f"p_min ({self.p_min}) must not exceed p_max ({self.p_max})")
        return self


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'host:6379', 'ray://host:10001'). null: the "
        "RAY_ADDRESS environment variable if set, else a local Ray on this machine's CPUs.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks) per trial.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per worker; fractions let small trials share a core.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per worker, as Ray assigns them; > 0 trains on CUDA with NCCL (each worker on "
        "the GPU Ray gave it). 0 on a machine with GPUs stops the run with an error naming this key. Fractions "
        "share a GPU between trials or evaluations, and need num_workers 1: NCCL refuses two ranks of one run "
        "on one GPU.")
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand (Ray autoscaler): plan for the resources asked "
        "for, not for the nodes up now (tune does not refuse to start on a cluster whose GPU nodes are still "
        "to come; trials wait for them).")

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> "RayConfig":
        if self.num_workers > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker:g} with num_workers={self.num_workers}: Ray may put two "
                "ranks of one run on one GPU, which NCCL refuses; use a whole number of GPUs per worker (or "
                "num_workers: 1 to share GPUs between trials)")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2] = Field(
        0, description="ZeRO stage (0: data parallel; 1/2: optimizer state / gradients sharded across "
        "workers). Stage 3 is not offered: it shards parameters, and PETL trains too few for it to pay.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a CUDA GPU that supports it, else fp32 (fp16 is not supported).")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches (of train.batch_size each) whose gradients are summed into one "
        "optimizer step: the step's batch is batch_size x this x workers, for a GPU that cannot hold it at once. "
        "Gradient masks are drawn once per optimizer step; the LR schedule counts optimizer steps. Must divide "
        "the micro-batches of an epoch (a checkpoint falls on a step boundary).")


class TrainConfig(OptimConfig):
    protocol: Literal["select", "standard"] = Field(
        "select",
        description="select: train on train800, keep the best epoch on val200 (the reported model never sees "
        "val200). standard (VTAB-1k papers: NOAH, DyT, Dyn-Adapter): the same run picks the epoch count on "
        "val200, then a fresh model trains that many epochs on train800val200 and is the one reported on test; "
        "its exit thresholds are calibrated on val200 with a threshold donor trained the same way on train800 "
        "only (adapt.retrain_for_calibration; see pipelines/evaluate.py).",
    )
    priority: PriorityConfig = PriorityConfig()
    sparsity: SparsityConfig = SparsityConfig()
    distill: float = Field(0.0, ge=0, description="Weight of self-distillation (last exit -> earlier); 0 = off.")
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of self-distillation.")
    ray: RayConfig = Field(
        RayConfig(),
        description="Where the train and evaluate stages run. With an address (or RAY_ADDRESS set) each task x "
        "variant trains as one Ray Train run of num_workers DeepSpeed workers, the runs concurrently as far as "
        "the cluster's resources allow, and evaluation fans out one Ray task per task and variant "
        "(cpus_per_worker / gpus_per_worker each). Without one both run here, one after another, without Ray.")
    deepspeed: DeepSpeedConfig = Field(
        DeepSpeedConfig(),
        description="The DeepSpeed engine of train-stage runs on a Ray cluster or a local CUDA GPU (on the CPU "
        "without a cluster: plain AdamW).")
    storage: str | None = Field(
        None, description="On a Ray cluster: where the train runs keep their epoch checkpoints, a folder or URI "
        "every node reaches (shared filesystem, s3://...). null: <paths.models>/checkpoints/train-ray here.")


class EvaluateConfig(Section):
    calibration: Literal["path", "search"] = Field(
        "path", description="Threshold calibration on val: path (one shared threshold, the largest the budget "
        "affords: accuracy follows the budget) or search (per-exit thresholds maximising val accuracy; scored "
        "against path on held-out val halves in per_task.json `mode_comparison`).")
    target: Literal["budget", "accuracy_drop"] = Field(
        "budget", description="What the thresholds promise. budget: mean MACs within base.budget (with "
        "budget_confidence). accuracy_drop: the cheapest thresholds whose accuracy drop against the last exit "
        "is at most max_drop with probability drop_confidence (base.budget then only labels the budget curve).")
    budget_confidence: float | None = Field(
        0.9, gt=0, lt=1, description="Probability that the expected MACs per image on new data from the same "
        "distribution stay within the budget (an exact upper confidence bound from val200, fixed-sequence "
        "testing along the path: dynadapter/inference/guarantee.py). null: the val mean fills the budget, as "
        "before (over it on test about half the time). 0.9: chosen on held-out val halves (BENCHMARKS.md §7). "
        "Needs calibration: path.")
    max_drop: float = Field(
        0.02, ge=0, lt=1, description="target accuracy_drop: the largest accuracy drop against the last exit "
        "allowed (0.02 = 2 points). With 200 val images nothing below about 0.015 can be certified at 0.9 "
        "(0 errors in 200 still leave 1.5 %); smaller values get full depth.")
    drop_confidence: float = Field(
        0.9, gt=0, lt=1, description="target accuracy_drop: probability with which the drop is certified.")
    transfer_probe: bool = Field(
        True, description="Report how the backbone transfers (metrics.json `transfer`): linear probes on its "
        "frozen features vs a random-init backbone and raw pixels, train -> val.")
    throughput_batch: int = Field(
        256, ge=0, description="Test images timed for compacted dynamic vs full-depth CPU throughput; 0 = skip.")
    throughput_repeats: int = Field(5, ge=1, description="Timed repeats (the median is reported).")

    @model_validator(mode="after")
    def _certified_path(self) -> EvaluateConfig:
        if self.budget_confidence is not None and self.calibration != "path":
            raise ValueError("budget_confidence certifies the path calibration only; set calibration: path, or "
                             "budget_confidence: null for search")
        return self


# ------------------------------------------------------------------------------------------------- tune

Range = list[float]  # [low, high]; low == high fixes the value


def _check_range(v: Range | None, lo: float, hi: float | None, hi_open: bool = False) -> None:
    """A [low, high] search range inside [lo, hi] (hi excluded when hi_open); pydantic prefixes the key."""
    if v is None:
        return
    if len(v) != 2 or v[0] > v[1]:
        raise ValueError(f"expected [low, high] with low <= high, got {v}")
    above = (v[1] >= hi if hi_open else v[1] > hi) if hi is not None else False
    if v[0] < lo or above:
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"range {v} must lie in {bound}")


class SearchSpaceConfig(Section):
    """What Ray Tune samples per trial; a key set to null is not searched (its `train` value is used)."""

    p_max: Range | None = Field([0.0, 0.4], description="train.sparsity.p_max range (uniform).")
    p_min: Range | None = Field(
        [0.0, 0.2], description="train.sparsity.p_min range (uniform); a draw above the trial's p_max is "
        "clipped to it, since dropout must not rise with depth.")
    q: Range | None = Field([0.0, 0.3], description="train.sparsity.q range (uniform).")
    priority_start: Range | list[Range] | None = Field(
        None, description="train.priority.start: one [low, high] range for every exit (each drawn "
        "independently), or one range per exit; null: the pattern/strength below are searched instead.")
    priority_end: Range | list[Range] | None = Field(
        None, description="train.priority.end, as priority_start.")
    priority_pattern: list[PriorityPattern] | None = Field(
        ["shallow_first", "deep_first"], description="train.priority.pattern choices (one drawn per trial).")
    priority_strength: Range | None = Field([0.0, 0.8], description="train.priority.strength range (uniform).")
    lr: Range | None = Field(None, description="train.lr range (log-uniform); null: not searched.")

    @field_validator("p_max", "p_min", "q", "priority_strength")
    @classmethod
    def _rates(cls, v: Range | None) -> Range | None:
        _check_range(v, 0.0, 1.0, hi_open=True)
        return v

    @field_validator("priority_start", "priority_end")
    @classmethod
    def _weights(cls, v: Range | list[Range] | None) -> Range | list[Range] | None:
        for r in v if v and isinstance(v[0], list) else [v]:
            _check_range(r, 0.0, None)
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: Range | None) -> Range | None:
        if v is not None and v[0] <= 0:
            raise ValueError(f"a log-uniform lr range must be > 0, got {v}")
        _check_range(v, 0.0, None)
        return v


class AshaConfig(Section):
    grace_period: int = Field(1, gt=0, description="Epochs every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps the top 1/reduction_factor of trials at each rung.")


class TuneConfig(Section):
    num_samples: int = Field(8, gt=0, description="Trials (configurations sampled from search_space).")
    max_concurrent: int | None = Field(
        None, gt=0, description="Trials run at once; null: as many as the cluster's CPUs/GPUs fit.")
    epochs: int = Field(5, gt=0, description="Training epochs per trial (the most a trial gets under ASHA).")
    budget: float = Field(
        0.5, gt=0, le=1, description="FLOPs budget the trials are scored at (val accuracy after calibrating on "
        "val), a fraction of full depth. Its own key, not base.budget: changing the inference budget must not "
        "retune and retrain; retuning for another budget is a deliberate change of this key.")
    objective: Literal["budget", "curve"] = Field(
        "curve", description="What the search maximises, on val, as the mean over the tune tasks: `curve`, the "
        "mean val accuracy over curve_budgets (one trained model serves every budget; metric val_curve_acc), or "
        "`budget`, the val accuracy at tune.budget only (val_budget_acc). Both are reported every epoch.")
    curve_budgets: list[float] = Field(
        [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], description="Budgets (fractions of full depth) the `curve` "
        "objective averages val accuracy over, each after calibrating thresholds on val for it.")
    searcher: Literal["random", "tpe"] = Field(
        "random", description="How trials are drawn: `random` (Ray's BasicVariantGenerator) or `tpe` (Optuna's "
        "Tree-structured Parzen Estimator through ray.tune.search.optuna, its first startup_trials random). "
        "Either way ASHA stops weak trials early.")
    startup_trials: int = Field(
        3, gt=0, description="tpe only: trials drawn at random before the model proposes (Optuna's own default, "
        "10, would make a small sweep all random).")
    tasks: list[str] | None = Field(
        None, description="Tasks to tune on (a subset of base.tasks); the metric is their mean. null: all.")
    max_failures: int = Field(
        1, ge=0, description="Retries of a failed trial; each resumes from its last epoch checkpoint.")
    checkpoints_to_keep: int = Field(2, gt=0, description="Epoch checkpoints kept per trial.")
    storage: str | None = Field(
        None, description="Where trials keep results and checkpoints: a folder or URI every Ray node reaches "
        "(shared filesystem, s3://...). null: <paths.models>/checkpoints/tune on this machine.")
    scheduler: AshaConfig = AshaConfig()
    search_space: SearchSpaceConfig = SearchSpaceConfig()
    ray: RayConfig = RayConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @field_validator("curve_budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < b <= 1 for b in v):
            raise ValueError(f"curve_budgets must be fractions of full depth in (0, 1], at least one; got {v}")
        return sorted(set(v))

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("tasks must name at least one task (or be null for all of base.tasks)")
        return v


class RegisterConfig(Section):
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                       description="Registry alias moved to a new version only when it is at least as good.")
    model_prefix: str = Field("dynadapter", pattern=r"^[A-Za-z0-9_.-]+$",
                              description="Registered model name = <model_prefix>-<task> (one model per task).")


# ---------------------------------------------------------------------------------------------- top level


# `register` is also a classmethod name pydantic's BaseModel inherits (from ABC registration); the field wins on
# instances, which is all we use, so pydantic's warning about the shadowing is silenced here only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(Section):
        """The whole params.yaml. Sections for later stages are optional so each stage can run alone."""

        model_config = ConfigDict(extra="allow")
        base: BaseSection = BaseSection()
        prepare: PrepareConfig = PrepareConfig()
        pretrain: PretrainConfig = PretrainConfig()
        train: TrainConfig = TrainConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        tune: TuneConfig = TuneConfig()
        register: RegisterConfig = RegisterConfig()

        @model_validator(mode="after")
        def _tune_tasks_known(self) -> Params:
            unknown = [t for t in self.tune.tasks or [] if t not in self.base.tasks]
            if unknown:
                raise ValueError(f"tune.tasks {unknown} are not in base.tasks {self.base.tasks}")
            return self


KNOWN_SECTIONS = {"base", "prepare", "pretrain", "train", "tune", "evaluate", "register"}


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if not e["loc"]:  # a cross-section check: its message names the keys; the input is the whole file
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {e['input']!r})")
        else:
            lines.append(f"  {path}: {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw params tree, returning a copy."""
    tree = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(text))
    return tree


def parse_params(raw: dict | None, source: str = "params.yaml") -> Params:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    unknown = sorted(set(raw) - KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(KNOWN_SECTIONS)}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    with path.open() as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(apply_overrides(raw, overrides), str(path))


def config_digest(tree: Any, length: int = 12) -> str:
    """A short hex digest of plain config data (JSON with sorted keys): the same settings, the same digest. What
    names a run's folder or a sweep, so an interrupted one is found again."""
    import hashlib
    import json

    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def section_dict(params: Params, *sections: str) -> dict:
    """The resolved sections as plain data (what a stage saves next to its outputs)."""
    out = {}
    for name in sections:
        value = getattr(params, name)
        out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out


def save_resolved(params: Params, sections: list[str], path: str | Path) -> None:
    from dynadapter.atomic import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(section_dict(params, *sections), sort_keys=False))
