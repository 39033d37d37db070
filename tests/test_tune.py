"""Contracts of the distributed path: the DeepSpeed strategy under `fit`, device/precision placement, the tune
config section, resource budgeting, search space -> params overrides, and a real Ray Tune run (Ray Train
workers + DeepSpeed inside each trial) that survives a worker crash by resuming from its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynadapter.config import (
    BackboneConfig,
    ConfigError,
    DeepSpeedConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    parse_params,
)
from dynadapter.models import build_model, resolve_exits
from dynadapter.train import PrioritySchedule, fit, load_checkpoint, trainable_state
from dynadapter.train.deepspeed import Placement, deepspeed_strategy, ds_config, resolve_placement
from dynadapter.tune import (
    CURVE_METRIC,
    METRIC,
    TRAINABLE_CPU,
    TuneTask,
    apply_overrides_to,
    overrides_from,
    plan_resources,
    objective_metric,
    run_tune,
    search_space,
    searcher,
    write_best_params,
)

from helpers import FailsOnce, one_thread  # noqa: F401  (one_thread: autouse, one intra-op thread per module)

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2)


def tiny_model(num_classes: int = 2):
    torch.manual_seed(0)
    return build_model(BackboneConfig(overrides=TINY), ModelConfig(), num_classes)


def toy_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by the mean of one colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (2.0 * y - 1.0)[:, None, None]
    return x, y


# ------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize(
    "precision, cuda, bf16, expected",
    [
        ("auto", False, False, Placement("cpu", "gloo", "fp32")),
        ("auto", True, True, Placement("cuda", "nccl", "bf16")),
        ("auto", True, False, Placement("cuda", "nccl", "fp32")),
        ("bf16", False, False, Placement("cpu", "gloo", "bf16")),  # allowed on CPU when asked for
        ("fp32", True, True, Placement("cuda", "nccl", "fp32")),
    ],
)
def test_placement_follows_the_device(precision, cuda, bf16, expected):
    placement = resolve_placement(precision, cuda=cuda, bf16_supported=bf16)
    assert placement == expected
    cfg = ds_config(32, DeepSpeedConfig(zero_stage=1, precision=precision), placement=placement)
    assert cfg["bf16"]["enabled"] is (expected.precision == "bf16")
    assert cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours are handed to the engine


def test_bf16_on_a_gpu_without_it_names_the_key():
    with pytest.raises(ValueError, match="deepspeed.precision"):
        resolve_placement("bf16", cuda=True, bf16_supported=False)


# ------------------------------------------------------------------------------------------ DeepSpeed under fit


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_strategy_trains_and_resumes_exactly(tmp_path, zero_stage):
    train, val = toy_split(64, 0), toy_split(32, 1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, warmup_epochs=0.5)
    strategy = deepspeed_strategy(DeepSpeedConfig(zero_stage=zero_stage, precision="fp32"))

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = fit(model, train, val, cfg, seed=0, strategy=strategy, progress=False)
    losses = [h["train_loss"] for h in full.history]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable  # the frozen backbone never moves

    # interrupted after epoch 1 (checkpoint on disk), then resumed: same history, same weights
    ckpt = tmp_path / "ckpt.pt"

    class Interrupt(Exception):
        pass

    def stop_after_1(epoch, metrics):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(tiny_model(), train, val, cfg, seed=0, strategy=strategy, checkpoint_path=ckpt,
            on_epoch_end=stop_after_1, progress=False)
    load_checkpoint(ckpt)  # weights_only=True: tensors and primitives only
    resumed_model = tiny_model()
    resumed = fit(resumed_model, train, val, cfg, seed=0, strategy=strategy, checkpoint_path=ckpt, progress=False)
    assert resumed.resumed_from == 1
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(losses, rel=1e-6)
    a, b = trainable_state(model), trainable_state(resumed_model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_deepspeed_bf16_on_cpu_trains_with_fp32_logits():
    train = toy_split(32, 0)
    model = tiny_model()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2)
    result = fit(model, train, None, cfg, strategy=deepspeed_strategy(DeepSpeedConfig(precision="bf16")),
                 progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(train[0][:4])  # fp32 input is cast in, logits come back in fp32
    assert all(o.dtype == torch.float32 for o in out)


# ------------------------------------------------------------------------------------------ config + search space


@pytest.mark.parametrize(
    "tune, key",
    [
        ({"search_space": {"p_max": [0.5, 0.1]}}, "tune.search_space.p_max"),
        ({"search_space": {"q": [0.0, 1.0]}}, "tune.search_space.q"),
        ({"search_space": {"priority_end": [[1.0, 2.0], [-1.0, 1.0]]}}, "tune.search_space.priority_end"),
        ({"search_space": {"lr": [0.0, 0.1]}}, "tune.search_space.lr"),
        ({"deepspeed": {"zero_stage": 3}}, "tune.deepspeed.zero_stage"),
        ({"ray": {"cpus_per_worker": 0}}, "tune.ray.cpus_per_worker"),
        ({"ray": {"gpus": 1}}, "tune.ray.gpus"),
        ({"tasks": ["nope"]}, "tune.tasks"),
        ({"searcher": "bohb"}, "tune.searcher"),
        ({"objective": "area"}, "tune.objective"),
        ({"curve_budgets": [0.5, 1.5]}, "tune.curve_budgets"),
        ({"curve_budgets": []}, "tune.curve_budgets"),
    ],
)
def test_tune_config_errors_name_the_key(tune, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params({"tune": tune})


def test_params_yaml_has_a_valid_tune_section():
    """The project's tune section searches something, on tasks it trains, and every corner of its search space
    (plus random draws) is a valid train section for the project's model."""
    params = parse_params(yaml.safe_load(Path(__file__).parents[1].joinpath("params.yaml").read_text()))
    tune_cfg, base = params.tune, params.base
    assert tune_cfg.tasks is None or set(tune_cfg.tasks) <= set(base.tasks)
    assert 1 <= tune_cfg.epochs <= params.train.epochs and tune_cfg.num_samples >= 2
    depth = base.backbone.overrides.get("depth", 12)
    num_exits = len(resolve_exits(base.model, depth))
    space = search_space(tune_cfg, num_exits=num_exits)
    assert {"p_max", "q", "priority_strength", "priority_pattern"} <= set(space)  # sparsity and prioritization
    domains = {k: v for k, v in space.items() if hasattr(v, "lower")}
    assert all(v.lower < v.upper for v in domains.values()), space
    gen = np.random.default_rng(0)
    draws = [{k: getattr(v, end) for k, v in domains.items()} for end in ("lower", "upper")]
    draws += [{k: float(gen.uniform(v.lower, v.upper)) for k, v in domains.items()} for _ in range(5)]
    for sampled in draws:
        cfg = apply_overrides_to(params.train, overrides_from(sampled, params.train))
        assert 0.0 <= cfg.sparsity.p_min <= cfg.sparsity.p_max < 1.0 and 0.0 <= cfg.sparsity.q < 1.0
        assert cfg.priority.start is None and 0.0 <= cfg.priority.strength < 1.0
        weights = PrioritySchedule.from_config(cfg.priority, num_exits)
        assert len(weights.start) == num_exits and all(w >= 0 for w in weights.start + weights.end)
        assert cfg.sparsity.p_max == pytest.approx(sampled["p_max"]) and cfg.sparsity.q == pytest.approx(sampled["q"])


def test_objective_names_the_metric_the_search_maximises():
    assert objective_metric(parse_params({}).tune) == CURVE_METRIC  # the default: the curve one model serves
    assert objective_metric(parse_params({"tune": {"objective": "budget"}}).tune) == METRIC
    assert parse_params({"tune": {"curve_budgets": [1.0, 0.5, 0.5]}}).tune.curve_budgets == [0.5, 1.0]


def _suggestions(cfg, seed: int, n: int) -> list[dict]:
    """The first `n` configurations a searcher proposes over the project's space, each reported back with a
    score that rewards small p_max (so a model-based searcher has something to learn)."""
    alg = searcher(cfg, seed, max_concurrent=1)
    space = search_space(cfg, num_exits=4)
    assert alg.set_search_properties(METRIC, "max", space)
    out = []
    for i in range(n):
        config = alg.suggest(f"t{i}")
        out.append(config)
        alg.on_trial_complete(f"t{i}", {METRIC: 1.0 - config["p_max"], "epoch": 1})
    return out


def test_tpe_searcher_is_optuna_seeded_by_base_seed_and_learns_after_its_startup_trials():
    """tune.searcher: tpe is Optuna's TPE behind Ray's OptunaSearch (real Optuna): the same seed proposes the
    same trials, another seed others; after startup_trials random draws it proposes from its model, here
    the small p_max the scores reward."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    cfg = parse_params({"tune": {"searcher": "tpe", "startup_trials": 3}}).tune
    alg = searcher(cfg, 0, max_concurrent=2)
    assert isinstance(alg, ConcurrencyLimiter) and isinstance(alg.searcher, OptunaSearch)
    assert alg.max_concurrent == 2
    assert isinstance(searcher(parse_params({}).tune, 0, 2), BasicVariantGenerator)
    first = _suggestions(cfg, 0, 20)
    assert first == _suggestions(cfg, 0, 20) and first != _suggestions(cfg, 1, 20)
    assert {c["priority_pattern"] for c in first} <= {"shallow_first", "deep_first"}
    startup = [c["p_max"] for c in first[:3]]
    learned = [c["p_max"] for c in first[12:]]
    assert np.mean(learned) < np.mean(startup) and np.mean(learned) < 0.1  # the range is [0, 0.4]


def test_search_space_maps_to_valid_train_overrides():
    params = parse_params({"tune": {"search_space": {"priority_start": [0.5, 2.0],
                                                     "priority_end": [[0.5, 1.0], [1, 1], [1, 2], [2, 2]],
                                                     "lr": [1e-4, 1e-2]}}})
    space = search_space(params.tune, num_exits=4)
    assert {"p_max", "p_min", "q", "lr"} <= set(space)
    assert [k for k in space if k.startswith("priority_start_")] == [f"priority_start_{i}" for i in range(4)]
    assert space["priority_end_1"] == 1.0  # a [v, v] range is a constant, not a draw
    with pytest.raises(ValueError, match="tune.search_space.priority_end"):
        search_space(params.tune, num_exits=3)

    sampled = {"p_max": 0.1, "p_min": 0.3, "q": 0.2, "lr": 3e-3,
               **{f"priority_start_{i}": 1.0 + i for i in range(4)}}
    overrides = overrides_from(sampled, params.train)
    assert overrides["train.sparsity.p_min"] == 0.1  # clipped to p_max: dropout must not rise with depth
    assert overrides["train.priority.start"] == [1.0, 2.0, 3.0, 4.0]
    cfg = apply_overrides_to(params.train, overrides)
    assert (cfg.sparsity.p_max, cfg.sparsity.q, cfg.lr) == (0.1, 0.2, 3e-3)


def test_default_search_space_searches_the_priority_pattern_not_free_weights():
    """Audit #14: 8 independent per-exit weights had no increasing/declining structure; the default space
    draws a pattern and its strength, which map to a schedule with the paper's shape."""
    params = parse_params({})
    space = search_space(params.tune, num_exits=4)
    assert not [k for k in space if k.startswith(("priority_start_", "priority_end_"))]
    assert {"priority_pattern", "priority_strength"} <= set(space)
    overrides = overrides_from({"priority_pattern": "deep_first", "priority_strength": 0.6}, params.train)
    assert overrides == {"train.priority.pattern": "deep_first", "train.priority.strength": 0.6}
    cfg = apply_overrides_to(params.train, overrides)
    from dynadapter.train.losses import PrioritySchedule

    sched = PrioritySchedule.from_config(cfg.priority, 4)
    assert sched.weights(0.0) == pytest.approx([0.4, 0.8, 1.2, 1.6])  # deep exits lead early ...
    assert sched.weights(1.0) == pytest.approx([1.6, 1.2, 0.8, 0.4])  # ... and hand over to shallow ones


@pytest.mark.parametrize(
    "cluster, ray_cfg, cap, concurrent",
    [
        ({"CPU": 2}, RayConfig(cpus_per_worker=1.0), None, 1),  # 2 x 1.01 CPU does not fit in 2
        ({"CPU": 2}, RayConfig(cpus_per_worker=0.5), None, 3),  # 3 x 0.51 <= 2
        ({"CPU": 2}, RayConfig(cpus_per_worker=0.5), 1, 1),
        ({"CPU": 16}, RayConfig(num_workers=2, cpus_per_worker=2.0), None, 3),
        ({"CPU": 16, "GPU": 2}, RayConfig(cpus_per_worker=1.0, gpus_per_worker=1.0), None, 2),
    ],
)
def test_resource_plan_fits_whole_trials(cluster, ray_cfg, cap, concurrent):
    plan = plan_resources(cluster, ray_cfg, cap)
    assert plan.max_concurrent == concurrent
    assert plan.cpu_per_trial == pytest.approx(TRAINABLE_CPU + ray_cfg.num_workers * ray_cfg.cpus_per_worker)
    assert plan.max_concurrent * plan.cpu_per_trial <= cluster["CPU"]


def test_resource_plan_refuses_a_trial_that_cannot_fit():
    with pytest.raises(ValueError, match="tune.ray"):
        plan_resources({"CPU": 2}, RayConfig(cpus_per_worker=2.0), None)
    with pytest.raises(ValueError, match="tune.ray"):
        plan_resources({"CPU": 8}, RayConfig(gpus_per_worker=1.0), None)


# ------------------------------------------------------------------------------------------ ASHA across a restore


def _asha_run(scheduler_cls, events, storage):
    """Feed (trial, epoch, score) results to an ASHA scheduler as Tune does (max_t 3, grace 1, halving); a
    "restore" event replaces the scheduler by a fresh one and re-adds the trials, as `Tuner.restore` does (it
    unpickles the scheduler of tuner.pkl, built before any result). Returns the decisions."""
    from types import SimpleNamespace

    import pyarrow.fs

    store = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(storage))
    trials = {t: SimpleNamespace(trial_id=t, storage=store) for t in ("t1", "t2")}

    def fresh():
        s = scheduler_cls(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2)
        s.set_search_properties(METRIC, "max")
        for t in trials.values():
            s.on_trial_add(None, t)
        return s

    sched, decisions = fresh(), []
    for event in events:
        if event == "restore":
            sched = fresh()
            continue
        trial, epoch, score = event
        result = {"epoch": epoch, METRIC: score}
        decisions.append((trial, epoch, sched.on_trial_result(None, trials[trial], result)))
        if epoch == 3:
            sched.on_trial_complete(None, trials[trial], result)
    return decisions


def test_asha_rungs_come_back_after_a_restore_and_never_take_a_later_epoch(tmp_path):
    """Issue 22.10 as its figures had it: trial 1 scores 0.40, 0.60, 0.684 at epochs 1-3, trial 2 0.485 at epoch
    1. Uninterrupted, trial 2 beats rung 1's cutoff (trial 1's 0.40) and goes on. Interrupted after trial 1's
    epoch 1 and restored, Ray's ASHA starts with empty rungs and trial 1 (resumed at epoch 2) has no rung-1
    record: its final 0.684 falls through to rung 1 and trial 2 is stopped. ResumableASHA keeps the run's
    rungs in the experiment folder and decides as the uninterrupted sweep did."""
    from ray.tune.schedulers import ASHAScheduler

    from dynadapter.asha import STATE_FILE, ResumableASHA, saved_results

    t1 = [("t1", 1, 0.40), ("t1", 2, 0.60), ("t1", 3, 0.684)]
    uninterrupted = t1 + [("t2", 1, 0.485)]
    interrupted = t1[:1] + ["restore"] + t1[1:] + [("t2", 1, 0.485)]

    assert _asha_run(ASHAScheduler, uninterrupted, tmp_path / "a")[-1] == ("t2", 1, "CONTINUE")
    assert _asha_run(ASHAScheduler, interrupted, tmp_path / "b")[-1] == ("t2", 1, "STOP")  # Ray's: the bug
    for events, storage in ((uninterrupted, tmp_path / "c"), (interrupted, tmp_path / "d")):
        storage.mkdir()
        assert _asha_run(ResumableASHA, events, storage)[-1] == ("t2", 1, "CONTINUE")
    # the rungs on disk: each trial's score at the rungs it reached (trial 1: epochs 1 and 2), nothing else
    saved = yaml.safe_load((tmp_path / "d" / STATE_FILE).read_text())
    assert {t: (e["bracket"], e["rungs"]) for t, e in saved.items()} == {"t1": (0, {"0": 0.60, "1": 0.40}),
                                                                         "t2": (0, {"1": 0.485})}
    # ... and every result it saw, across the restore (the history Tune loses for a restarted trial)
    assert saved_results(str(tmp_path / "d")) == {
        "t1": [{"epoch": e, METRIC: m} for _, e, m in t1], "t2": [{"epoch": 1, METRIC: 0.485}]}
    # a trial below the cutoff is still stopped, after a restore too
    events = t1[:1] + ["restore"] + t1[1:] + [("t2", 1, 0.30)]
    (tmp_path / "e").mkdir()
    assert _asha_run(ResumableASHA, events, tmp_path / "e")[-1] == ("t2", 1, "STOP")


# ------------------------------------------------------------------------------------------ a real tune run


class CrashOnce(FailsOnce, TuneTask):
    """Train data whose first worker to start its second epoch crashes (once per test, across processes):
    the trial must come back through Ray Train's FailureConfig from its epoch-1 checkpoint."""

    attr, at = "train", 3  # read 1: steps per epoch; then one read per epoch

    def fail(self) -> None:
        raise RuntimeError("injected worker crash at the start of epoch 2")


@pytest.mark.slow
def test_tune_runs_trials_with_train_workers_and_survives_a_crash(ray_session, tmp_path):
    import sys

    from ray import cloudpickle

    for module in (__name__, "helpers"):  # workers cannot import the test modules
        cloudpickle.register_pickle_by_value(sys.modules[module])
    params = parse_params({
        "base": {"tasks": ["toy"], "backbone": {"overrides": TINY}},
        "train": {"batch_size": 16, "lr": 1e-2},
        "tune": {"num_samples": 2, "epochs": 2, "max_failures": 1, "objective": "budget",
                 "scheduler": {"grace_period": 2},  # no early stop: both trials run both epochs
                 "ray": {"cpus_per_worker": 0.5}},  # 2 x (0.5 + 0.01) CPU: both trials at once on 2 cores
    })
    data = {"toy": CrashOnce(toy_split(64, 0), toy_split(32, 1), 2, marker=str(tmp_path / "crashed"))}
    outcome = run_tune(params, storage_path=tmp_path / "ray", data=data, verbose=0)

    assert (tmp_path / "crashed").exists()
    rows = outcome.trials
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    assert all(r["epochs"] == 2 and 0.0 <= r[METRIC] <= 1.0 for r in rows)
    assert all(r["val_budget_fraction"] <= params.tune.budget + 1e-9 for r in rows)
    assert sorted(r["resumed_from"] for r in rows) == [0, 1]  # the crashed trial resumed from epoch 1
    assert outcome.best_metric == max(r[METRIC] for r in rows)
    assert set(outcome.best_overrides) == {"train.sparsity.p_max", "train.sparsity.p_min", "train.sparsity.q",
                                           "train.priority.pattern", "train.priority.strength"}
    assert outcome.best_overrides["train.priority.pattern"] in ("shallow_first", "deep_first")
    assert 0.0 <= outcome.best_overrides["train.priority.strength"] <= 0.8
    assert len(outcome.table()) == 2

    path = write_best_params(outcome, tmp_path / "best_params.yaml")
    best = yaml.safe_load(path.read_text())
    assert best == outcome.best_overrides
    apply_overrides_to(params.train, best)  # the train stage can apply them as they are
    for trial in (tmp_path / "ray" / "tune" / "train_runs").iterdir():  # per-epoch checkpoints, kept
        assert (trial / "epoch_0002" / "rank0.pt").exists()


def test_init_ray_without_address_starts_its_own_instance_beside_a_running_one(ray_session):
    """With no address, Ray's own default joins the cluster of the last `ray start` on the machine (recorded
    in <RAY_TMPDIR>/ray/ray_current_cluster); the pipeline must start its own local instance, sized as asked."""
    import shutil
    import subprocess
    import sys
    import tempfile

    import ray

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
        code = ("import ray; from dynadapter.tune import init_ray; "
                "print('CPU', init_ray(num_cpus=1)['CPU']); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU 1.0" in out.stdout, out.stdout + out.stderr[-3000:]


# ------------------------------------------------------------------------------------------ a killed tune driver

# Two trials with one setting (a constant search space): they score alike at every epoch, so ASHA's halving
# (strictly below the cutoff stops) runs both to the end, unless a restore skews a rung. Same seed, same data.
SWEEP_EPOCHS = 3
SWEEP_SPACE = {"p_max": [0.1, 0.1], "p_min": None, "q": None, "priority_pattern": None, "priority_strength": None,
               "lr": None}


def sweep_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`toy_split` with a weak signal: accuracies that differ between trials and epochs, not all 1.0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += 0.6 * (2.0 * y - 1.0)[:, None, None]
    return x, y


class StallsOnce(FailsOnce, TuneTask):
    """Val data whose first reader of its 2nd read (trial 1 scoring epoch 2: epoch 1 is reported and its
    checkpoint registered, epoch 2 trained) marks that moment and stalls there, for the test to kill the driver."""

    attr, at = "val", 2

    def fail(self) -> None:
        import time

        time.sleep(600)


def sweep_driver(storage: str, out: str, stall_marker: str = "") -> None:
    """The tune driver the test runs (and kills) in a subprocess: `run_tune` with resume, 2 trials one at a
    time (ASHA's decisions then do not depend on timing), its outcome as JSON in `out`."""
    import json
    import sys

    from ray import cloudpickle

    from dynadapter.tune import init_ray

    for module in (__name__, "helpers"):  # workers cannot import the test modules
        cloudpickle.register_pickle_by_value(sys.modules[module])
    params = parse_params({
        "base": {"tasks": ["toy"], "backbone": {"overrides": TINY}},
        "train": {"batch_size": 16, "lr": 1e-2},
        "tune": {"num_samples": 2, "epochs": SWEEP_EPOCHS, "max_concurrent": 1, "max_failures": 0,
                 "scheduler": {"grace_period": 1, "reduction_factor": 2}, "search_space": SWEEP_SPACE,
                 "ray": {"cpus_per_worker": 1.0}},
    })
    splits = (sweep_split(64, 0), sweep_split(32, 1), 2)
    data = StallsOnce(*splits, marker=stall_marker) if stall_marker else TuneTask(*splits)
    init_ray(num_cpus=2)
    outcome = run_tune(params, storage_path=storage, data={"toy": data}, resume=True, verbose=0)
    index = {t: t.rsplit("_", 1)[1] for t in outcome.histories}  # trial ids differ between experiments
    Path(out).write_text(json.dumps({
        "best_trial": index[outcome.best_trial], "best_metric": outcome.best_metric,
        "best_overrides": outcome.best_overrides,
        "trials": sorted([{**{k: v for k, v in r.items() if k not in ("trial_id", "path")},
                           "trial": index[r["trial_id"]]} for r in outcome.trials], key=lambda r: r["trial"]),
        "histories": {index[t]: [{k: v for k, v in row.items() if k != "step_seconds"} for row in h]  # a timing
                      for t, h in outcome.histories.items()},
    }, sort_keys=True))


def _driver(storage: Path, out: Path, stall_marker: Path | None = None):
    import subprocess
    import sys

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_tune import sweep_driver; "
            f"sweep_driver({str(storage)!r}, {str(out)!r}, {str(stall_marker or '')!r})")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout: float = 900) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_session(proc)
        print(proc.communicate()[0][-5000:])
        raise
    _kill_session(proc)
    assert proc.returncode == 0, log[-5000:]
    return log


def _kill_session(proc) -> None:
    """SIGKILL the driver's whole session: what its local Ray left behind must not write on after the kill."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_killed_and_resumed_sweep_picks_the_winner_of_the_uninterrupted_one(tmp_path):
    """Issue 22.10: the tune driver is SIGKILLed in trial 1's epoch 2 (after its epoch-1 result reached Tune),
    then run again on the same storage: the resumed sweep must end as the uninterrupted one did, same trials
    stopped at the same epochs, same figures, same winner. Measured with Ray's own ASHA in place of ResumableASHA:
    the restored sweep put trial 1's final 0.906 at rung 1 and stopped trial 2 after epoch 1 at 0.5625 (the
    uninterrupted sweep runs it to epoch 3), and trial 1's history lost its epoch 1. About 3.5 minutes on the
    loaded 2-core box (three driver starts, two trials of 3 epochs each)."""
    import json
    import signal
    import time

    full = _driver(tmp_path / "full", tmp_path / "full.json")
    _finish(full)
    expected = json.loads((tmp_path / "full.json").read_text())
    # The case of the issue: trial 2's epoch-1 score reaches trial 1's (rung 1's cutoff, so it runs on) but not
    # trial 1's final score, which Ray's ASHA put at rung 1 after the restore (so it stopped trial 2 there).
    score = {t: [h[METRIC] for h in hist] for t, hist in expected["histories"].items()}
    assert score["00000"] == score["00001"] and score["00000"][0] < score["00000"][-1], score
    assert [r["epochs"] for r in expected["trials"]] == [SWEEP_EPOCHS, SWEEP_EPOCHS]

    marker = tmp_path / "stalled"
    cut = _driver(tmp_path / "cut", tmp_path / "cut.json", stall_marker=marker)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert cut.poll() is None, cut.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "trial 1 never reached its epoch-2 scoring"
            time.sleep(0.2)
        time.sleep(2.0)  # epoch 1's result is long through Tune by now; epoch 2 is stalled before its report
        os.kill(cut.pid, signal.SIGKILL)  # the driver, as a user's kill -9 (or the OOM killer) would
        cut.wait(timeout=60)
    finally:
        _kill_session(cut)
    assert not (tmp_path / "cut.json").exists()

    _finish(_driver(tmp_path / "cut", tmp_path / "cut.json"))
    resumed = json.loads((tmp_path / "cut.json").read_text())
    first = next(r for r in resumed["trials"] if r["trial"] == "00000")
    assert first["resumed_from"] == 1  # trial 1 came back from its epoch-1 checkpoint, not from scratch
    for r in resumed["trials"]:
        r["resumed_from"] = 0
    print(json.dumps(expected["trials"], indent=1))
    assert resumed == expected


def test_sweep_seconds_add_up_over_resumes(tmp_path):
    """A sweep resumed from its finished state reports the wall time it took, not the second the resume took."""
    from dynadapter.tune import SECONDS_FILE, add_sweep_seconds

    experiment = tmp_path / "tune-abc"
    experiment.mkdir()
    assert add_sweep_seconds(str(experiment), 140.0) == 140.0
    assert add_sweep_seconds(str(experiment), 0.75) == 140.75
    assert json.loads((experiment / SECONDS_FILE).read_text()) == {"seconds": 140.75}
    assert sorted(p.name for p in experiment.iterdir()) == [SECONDS_FILE]  # no temp file left behind
    (tmp_path / "tune-other").mkdir()
    assert add_sweep_seconds(str(tmp_path / "tune-other"), 2.0) == 2.0  # per experiment
