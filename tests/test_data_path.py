"""The cluster data path (issue 22.3): what travels to Ray workers and how much the driver holds.

- Train workers get train and val only, never test, and images travel as uint8.
- Evaluate submits at most as many tasks as the cluster fits, loading each task's val/test only when its
  evaluations are submitted, and yields results in task order.
- uint8 images normalised per batch on the device give the exact float32 values (and so the same training and
  evaluation) as the float data the local pipeline uses; throughput is timed on the evaluation's device.

Ray itself is replaced by a recording stand-in (`FakeRay`): these are contracts on what the driver submits and
holds, not on Ray (tests/test_ray_job.py runs the stages on a real head).
"""

from __future__ import annotations

import contextlib
import io
import types

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image

from dynadapter import adapt, cluster
from dynadapter.adapt import TaskData, TaskSource, evaluate_task, normalizing_inputs, to_model_input, train_task
from dynadapter.config import ModelConfig, PetlConfig, TrainConfig, load_params
from dynadapter.data import normalize
from dynadapter.data.store import write_task
from dynadapter.inference.runtime import ThroughputComparison
from helpers import backbone_cfg, one_thread, tiny_model  # noqa: F401 - one_thread: autouse fixture

SIZE = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Submitted(Exception):
    """Raised by FakeRay.get in tests that only look at what was submitted."""


class FakeRef:
    def __init__(self, fake, value=None, call=None):
        self.fake, self.value, self.call = fake, value, call


class FakeRemote:
    def __init__(self, fake, fn, options=None):
        self.fake, self.fn, self.opts = fake, fn, dict(options or {})

    def options(self, **options):
        return FakeRemote(self.fake, self.fn, {**self.opts, **options})

    def remote(self, *args, **kwargs):
        self.fake.submitted.append((self.fn, args, kwargs, self.opts))
        self.fake.in_flight += 1
        self.fake.max_in_flight = max(self.fake.max_in_flight, self.fake.in_flight)
        return FakeRef(self.fake, call=(self.fn, args, kwargs))


class FakeRay:
    """ray.put / ray.remote / ray.get that record what is put and submitted, and run a task when its result is
    fetched (so 'in flight' = submitted, not yet fetched)."""

    def __init__(self, cpus: float = 2.0, run=None):
        self.puts, self.submitted, self.in_flight, self.max_in_flight = [], [], 0, 0
        self.cpus, self.run = cpus, run

    def install(self, monkeypatch):
        monkeypatch.setattr(ray, "put", self.put)
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(ray, "wait", self.wait)
        monkeypatch.setattr(ray, "remote", self.remote)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": self.cpus})
        monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n" * 56, "Alive": True}])  # one node
        return self

    def put(self, value):
        self.puts.append(value)
        return FakeRef(self, value=value)

    def remote(self, *args, **options):
        if args and callable(args[0]):
            return FakeRemote(self, args[0])
        return lambda fn: FakeRemote(self, fn, options)

    def wait(self, refs, num_returns=1):
        return list(refs)[:num_returns], list(refs)[num_returns:]

    def get(self, ref):
        if ref.call is None:
            return ref.value
        self.in_flight -= 1
        if self.run is None:
            raise Submitted
        fn, args, kwargs = ref.call
        # as Ray: refs among a task's own arguments arrive resolved, refs nested in them do not
        return self.run(fn, tuple(a.value if isinstance(a, FakeRef) else a for a in args), kwargs)


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def prepared(root, tasks=("t0", "t1", "t2", "t3"), n=(8, 4, 6), classes=3):
    for k, task in enumerate(tasks):
        splits = ["train"] * n[0] + ["val"] * n[1] + ["test"] * n[2]
        write_task(root, task, [png(100 * k + i) for i in range(len(splits))], [i % classes for i in range(len(splits))],
                   splits, classes, "test")
    return root


def params_for(tmp_path, tasks, **train):
    raw = {"base": {"paths": {"data": str(tmp_path / "data"), "models": str(tmp_path / "models"),
                              "outputs": str(tmp_path / "outputs")},
                    "tasks": list(tasks), "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": None,
                                                       "overrides": {"img_size": SIZE, "patch_size": 8,
                                                                     "embed_dim": 24, "depth": 4, "num_heads": 2}}},
           "train": {"ray": {"address": "fake:6379", "cpus_per_worker": 1.0}, **train}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def uint8_task(n=(16, 8, 8), classes=3, seed=0) -> tuple[TaskData, TaskData]:
    """The same task as uint8 (+ norm) and as the float32 the local pipeline loads."""
    g = torch.Generator().manual_seed(seed)
    raw = [(torch.randint(0, 256, (k, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (k,), generator=g)) for k in n]
    as_float = [(normalize(x, MEAN, STD), y) for x, y in raw]
    return TaskData(*raw, classes, (MEAN, STD)), TaskData(*as_float, classes)


# ------------------------------------------------------------------------------------------ train


def _chains(tasks):
    return [cluster.fit_jobs(t, v, backbone_cfg(), ModelConfig(), TrainConfig(), seed=0, standard=False)
            for t in tasks for v in ("dyn", "baseline")]


def test_train_workers_get_train_and_val_only_as_uint8(tmp_path, monkeypatch):
    """The stage's driver, without a node of its own in the cluster, puts each task's train/val (uint8, no test)
    once, and the task's runs all receive that object."""
    tasks = ("t0", "t1", "t2")
    prepared(tmp_path / "data", tasks)
    params = params_for(tmp_path, tasks)
    fake = FakeRay(cpus=64.0).install(monkeypatch)  # room for every run at once: all submitted before a result
    monkeypatch.setattr("dynadapter.ray_session.init_ray", lambda address=None, **kw: {"CPU": 2.0})
    monkeypatch.setattr(cluster, "driver_node_id", lambda: None)  # a Ray Client driver: data goes via the store
    monkeypatch.setattr("dynadapter.train.pretrain.backbone_checkpoint", lambda cfg, models: None)  # random init
    from pipelines import train as train_stage

    with pytest.raises(Submitted):
        next(train_stage._train_on_cluster(params, "fake:6379", stdout=io.StringIO()))
    data = [p for p in fake.puts if isinstance(p, TaskData)]
    assert len(data) == len(tasks)  # one object per task, shared by its variants
    for d in data:
        assert d.test is None
        assert d.train[0].dtype == torch.uint8 and d.val[0].dtype == torch.uint8 and d.norm is not None
        assert len(d.train[0]) == 8 and len(d.val[0]) == 4
    runs = [s for s in fake.submitted if s[0] is cluster._run_jobs]
    assert len(runs) == 2 * len(tasks)
    assert all(isinstance(args[1]["data"], FakeRef) and args[1]["data"].value.test is None for _, args, _, _ in runs)


def test_train_data_given_whole_reaches_the_workers_without_test(monkeypatch):
    """train_jobs_on_ray with {task: TaskData} (test included) puts train/val only."""
    fake = FakeRay(cpus=64.0).install(monkeypatch)
    monkeypatch.setattr(cluster, "driver_node_id", lambda: None)
    data = {t: uint8_task(seed=k)[0] for k, t in enumerate(("a", "b"))}
    with pytest.raises(Submitted):
        next(cluster.train_jobs_on_ray(_chains(data), data, {"w": torch.zeros(2)}, storage_path="/tmp/x",
                                       stdout=io.StringIO()))
    put = [p for p in fake.puts if isinstance(p, TaskData)]
    assert len(put) == 2 and all(p.test is None and p.train is not None and p.val is not None for p in put)


def test_train_data_read_on_the_drivers_node_never_passes_through_the_driver(tmp_path, monkeypatch):
    """With the driver a node of the cluster, each run's Ray task (pinned to that node) reads its task's
    Parquet itself: the driver puts no images; what the task puts for the workers is train/val as uint8."""
    prepared(tmp_path / "data", ("t0",))
    fake = FakeRay().install(monkeypatch)
    monkeypatch.setattr(cluster, "driver_node_id", lambda: "a" * 56)
    source = TaskSource(str(tmp_path / "data"), "t0", SIZE, MEAN, STD)
    with pytest.raises(Submitted):
        next(cluster.train_jobs_on_ray(_chains(["t0"]), {"t0": source}, {"w": torch.zeros(2)},
                                       storage_path="/tmp/x", stdout=io.StringIO()))
    assert not [p for p in fake.puts if isinstance(p, TaskData)]
    (_, args, _, opts), _ = [s for s in fake.submitted if s[0] is cluster._run_jobs]
    assert args[1]["data"] == source and opts["scheduling_strategy"].node_id == "a" * 56
    on_worker = cluster.worker_data(source)
    assert on_worker.test is None and on_worker.train[0].dtype == torch.uint8 and on_worker.norm == (MEAN, STD)


def test_train_runs_what_the_cluster_fits_and_loads_a_task_as_its_first_run_starts(monkeypatch):
    """2 CPUs, 1 worker x 1 CPU per run: 2 runs in flight at most; a task's data is put when its first chain
    starts, not before; outcomes in the order of the jobs."""
    ran = []
    fake = FakeRay(cpus=2.0, run=lambda fn, args, kwargs: ran.append(args[0][0].name) or [args[0][0].name])
    fake.install(monkeypatch)
    monkeypatch.setattr(cluster, "driver_node_id", lambda: None)
    tasks = ["a", "b", "c", "d"]
    loads = []

    def load(task):
        loads.append(task)
        return uint8_task()[0]

    chains = _chains(tasks)
    out = []
    for outcome in cluster.train_jobs_on_ray(chains, load, {"w": torch.zeros(2)}, storage_path="/tmp/x",
                                             stdout=io.StringIO()):
        out.append(outcome[0])
        if len(out) == 1:
            assert loads == ["a", "b"]  # a's runs held the cluster; b's is loaded as the first slot frees
    assert out == [c[0].name for c in chains] and fake.max_in_flight == 2 and loads == tasks


# ------------------------------------------------------------------------------------------ evaluate


def test_map_on_ray_keeps_at_most_n_in_flight_and_yields_in_order(monkeypatch):
    fake = FakeRay(cpus=3.0, run=lambda fn, args, kwargs: fn(*args, **kwargs)).install(monkeypatch)
    drawn = []

    def calls():
        for i in range(10):
            drawn.append(i)
            yield (i,), {}

    ray_cfg = TrainConfig().ray.model_copy(update={"cpus_per_worker": 1.0})
    out = []
    for r in cluster.map_on_ray(lambda i: i * i, calls(), ray_cfg):
        out.append(r)
        assert len(drawn) <= len(out) + 3  # drawn lazily: never more than the 3 the cluster fits ahead
    assert out == [i * i for i in range(10)]
    assert fake.max_in_flight == 3  # 3 CPUs / 1 CPU per task


def test_evaluate_loads_one_task_at_a_time_and_submits_what_the_cluster_fits(tmp_path, monkeypatch):
    """evaluations() on a cluster of 2 CPUs (1 per task): never more than 2 evaluations in flight, each task's
    val/test (uint8, no train) put once and loaded only as its evaluations are submitted, results in order."""
    from pipelines import evaluate as evaluate_stage

    tasks = ("t0", "t1", "t2", "t3")
    prepared(tmp_path / "data", tasks)
    params = params_for(tmp_path, tasks)
    loaded, events = [], []

    def fake_evaluate(model, data, **kwargs):
        assert data.train is None and data.val[0].dtype == torch.uint8 and data.test[0].dtype == torch.uint8
        events.append(("ran", model.name))
        return types.SimpleNamespace(calibration={"thresholds": [0.5]}, name=model.name)

    def load_trained(saved, checkpoint):
        task, variant = saved.parts[-2:]
        loaded.append(task)
        events.append(("loaded", f"{task}/{variant}"))
        return types.SimpleNamespace(name=f"{task}/{variant}"), None, None

    fake = FakeRay(cpus=2.0, run=lambda fn, args, kwargs: fn(*args, **kwargs)).install(monkeypatch)
    monkeypatch.setattr("dynadapter.ray_session.init_ray", lambda address=None, **kw: {"CPU": 2.0})
    monkeypatch.setattr(adapt, "load_trained", load_trained)
    monkeypatch.setattr(adapt, "merged_for_inference", lambda model, thresholds=None: model)
    monkeypatch.setattr(evaluate_stage, "_evaluate_on_worker", fake_evaluate)

    got = []
    for task, variant, model, trained, ev in evaluate_stage.evaluations(params, None):
        got.append(f"{task}/{variant}")
        assert ev.name == model.name == f"{task}/{variant}"
        if len(got) == 1:  # the first result comes before the last tasks are even loaded
            assert set(loaded) <= {"t0", "t1"}
    assert got == [f"{t}/{v}" for t in tasks for v in ("dyn", "baseline")]
    assert fake.max_in_flight <= 2
    data = [p for p in fake.puts if isinstance(p, TaskData)]
    assert len(data) == len(tasks) and all(d.train is None and d.test[0].dtype == torch.uint8 for d in data)


def test_evaluate_worker_computes_on_the_device_ray_assigned(monkeypatch):
    from pipelines import evaluate as evaluate_stage

    seen = {}
    monkeypatch.setattr("dynadapter.devices.worker_device", lambda key="": seen.setdefault("key", key) and "cpu")
    monkeypatch.setattr(adapt, "evaluate_task", lambda model, data, device=None, **kw: seen.setdefault("device", device))
    evaluate_stage._evaluate_on_worker(object(), object())
    assert seen == {"key": "train.ray.gpus_per_worker", "device": "cpu"}


# ------------------------------------------------------------------------------------------ numerics


def test_uint8_normalised_on_the_device_equals_the_float_data_exactly():
    raw, flt = uint8_task()
    model = tiny_model(num_classes=3)
    with torch.no_grad():
        want = model(flt.test[0])
        with normalizing_inputs([model], raw.norm):
            got = model(raw.test[0])
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # on an accelerator (`meta` stands in): moved there as uint8, normalised there
    x = to_model_input(raw.test[0][:4], "meta", raw.norm)
    assert x.device.type == "meta" and x.dtype == torch.float32


def test_training_and_evaluation_on_uint8_data_equal_the_float_path():
    raw, flt = uint8_task()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, warmup_epochs=0.0)
    model_cfg = ModelConfig(petl=PetlConfig(method="adapter"))
    runs = [train_task("t", d, backbone_cfg(), model_cfg, cfg, None, seed=0, progress=False) for d in (raw, flt)]
    (tr_a, m_a), (tr_b, m_b) = runs
    assert [h["val_acc"] for h in tr_a.history] == [h["val_acc"] for h in tr_b.history]
    sa, sb = m_a.state_dict(), m_b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not m_a._forward_pre_hooks  # the normalising hook is gone after training
    ev_a = evaluate_task(m_a, raw, throughput_batch=4, repeats=1)
    ev_b = evaluate_task(m_b, flt, throughput_batch=4, repeats=1)
    assert ev_a.calibration == ev_b.calibration and ev_a.test == ev_b.test and ev_a.curve == ev_b.curve
    assert ev_a.throughput["exit_fraction"] == ev_b.throughput["exit_fraction"]


def test_throughput_is_timed_on_the_evaluation_device(monkeypatch):
    """dynamic_vs_full runs while the model is still placed on `device`, on a batch already there."""
    raw, _ = uint8_task()
    model = tiny_model(num_classes=3)
    state = {"placed": False}

    @contextlib.contextmanager
    def placed_on(models, device):
        state["placed"] = True
        try:
            yield
        finally:
            state["placed"] = False

    def timed(model, x, thresholds, repeats=5):
        state["timed_while_placed"] = state["placed"]
        state["dtype"] = x.dtype
        return ThroughputComparison(1.0, 1.0, 1.0, len(x), [1.0])

    monkeypatch.setattr(adapt, "placed_on", placed_on)
    monkeypatch.setattr(adapt, "dynamic_vs_full", timed)
    evaluate_task(model, raw, throughput_batch=4, repeats=1, device="cpu")
    assert state["timed_while_placed"] is True and state["dtype"] == torch.float32
