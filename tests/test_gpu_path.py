"""The GPU path, caught on a CPU-only machine (docs/distributed.md, "Testing the GPU path without a GPU").

The accelerator is faked with PyTorch's `meta` device, a second device on a CPU box: an op that mixes a meta
tensor with a CPU tensor raises "... is not on the expected device", as CUDA would. Ray Train V2's local mode
(`num_workers=0`) runs the production worker function in this process, where Ray's device assignment
(`get_devices`), `torch.cuda.is_available` and DeepSpeed's accelerator are made to say "meta": a worker then
believes it holds an accelerator. Correct code trains there; labels left on the CPU, or a device picked by hand
(`cuda:LOCAL_RANK`), fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch

from dynadapter.config import BackboneConfig, DeepSpeedConfig, ModelConfig, SparsityConfig, TrainConfig
from dynadapter.devices import GpuNotRequestedError, worker_device
from dynadapter.models import create_backbone

from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread per module)

TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2)
META = torch.device("meta")
# loading a CPU state dict into a meta model is a no-op (torch warns once per key): meta holds no values anyway
pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")


@dataclass
class Task:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    test: tuple[torch.Tensor, torch.Tensor] | None = None


def toy_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 3, 16, 16, generator=g), y


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0.5,
                       sparsity=SparsityConfig(p_max=0.3, p_min=0.1, q=0.3), **kw)


@pytest.fixture
def fake_accelerator(monkeypatch):
    """Every layer a GPU worker asks says `meta`: Ray Train's assignment, torch.cuda, DeepSpeed's accelerator.
    Yields the devices the multi-exit loss saw (logits and labels), to show the accelerator was really used."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    import dynadapter.train.loop as loop
    import ray.train.v2.torch.train_loop_utils as train_loop_utils

    acc = get_accelerator()  # chosen before torch.cuda is faked: DeepSpeed's CPU accelerator, made to say meta
    monkeypatch.setattr(acc, "device_name", lambda device_index=None: "meta")
    monkeypatch.setattr(acc, "current_device_name", lambda: "meta")
    monkeypatch.setattr(acc, "set_device", lambda device_index: None)
    monkeypatch.setattr(train_loop_utils, "get_devices", lambda: [META])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # torch's optimizers ask torch.accelerator for a CUDA stream when CUDA is available (graph-capture check)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)

    seen: list[tuple[str, str]] = []
    real_loss = loop.multi_exit_loss

    def recording_loss(logits, y, *args, **kwargs):
        seen.append((logits[0].device.type, y.device.type))
        return real_loss(logits, y, *args, **kwargs)

    monkeypatch.setattr(loop, "multi_exit_loss", recording_loss)
    return seen


@pytest.fixture(scope="module")
def backbone_state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in create_backbone(BackboneConfig(overrides=TINY)).state_dict().items()}


def local_mode_fit(worker, loop_config: dict, tmp_path, name: str):
    """The production TorchTrainer, in Ray Train's local mode (num_workers=0: the worker runs here)."""
    from dynadapter.distributed import torch_trainer

    result = torch_trainer(worker, loop_config, num_workers=0, worker_cpu=1, worker_gpu=0,
                           storage_path=str(tmp_path), name=name).fit()
    assert result.error is None, result.error
    return result


@pytest.mark.slow
def test_a_tune_trial_trains_on_the_accelerator_ray_assigned(ray_session, fake_accelerator, backbone_state, tmp_path):
    """One tune trial's worker (`dynadapter.trial.train_worker`: DeepSpeed engine, masks, dropout, scoring on
    val) on a faked accelerator. On the old code `run_epoch` got no device: the labels stayed on the CPU."""
    import ray

    from dynadapter.trial import TrialSpec, train_worker

    spec = TrialSpec(backbone=BackboneConfig(overrides=TINY).model_dump(mode="json"),
                     model=ModelConfig().model_dump(mode="json"), train=train_cfg().model_dump(mode="json"),
                     deepspeed=DeepSpeedConfig(zero_stage=0).model_dump(mode="json"), budget=0.5, seed=0,
                     tasks=["toy"])
    data = {"toy": Task(toy_split(16, 0), toy_split(8, 1), 3)}
    result = local_mode_fit(train_worker, {"spec": asdict(spec), "data": ray.put(data),
                                           "backbone": ray.put(backbone_state)}, tmp_path, "trial")
    assert result.metrics["epoch"] == 1
    assert fake_accelerator and set(fake_accelerator) == {("meta", "meta")}  # every step, on the accelerator


@pytest.mark.slow
def test_a_train_run_trains_on_the_accelerator_ray_assigned(ray_session, fake_accelerator, backbone_state, tmp_path):
    """One train-stage run's worker (`dynadapter.cluster.fit_worker`: `train_task` → `fit` with a DeepSpeed
    strategy and per-epoch checkpoints). On the old code `fit` read the model's device before the strategy moved
    it (the CPU), so the labels stayed there while the logits were on the accelerator."""
    import ray

    from dynadapter.adapt import TaskData
    from dynadapter.cluster import FitJob, fit_worker

    job = FitJob(name="toy-dyn", task="toy", backbone=BackboneConfig(overrides=TINY).model_dump(mode="json"),
                 model=ModelConfig().model_dump(mode="json"), train=train_cfg().model_dump(mode="json"), seed=0)
    data = TaskData(toy_split(16, 0), toy_split(8, 1), None, 3)
    result = local_mode_fit(fit_worker, {"job": asdict(job), "data": ray.put(data),
                                         "backbone": ray.put(backbone_state)}, tmp_path, "run")
    assert result.metrics["epoch"] == 1 and result.checkpoint is not None
    assert fake_accelerator and set(fake_accelerator) == {("meta", "meta")}


@pytest.mark.slow
def test_an_evaluate_task_runs_on_the_accelerator_ray_assigned(ray_session, fake_accelerator, tmp_path):
    """The evaluate stage's Ray task (`pipelines.evaluate._evaluate_on_worker`: device from Ray, uint8 images
    normalised there, val/test forward passes, calibration on the host) with the accelerator faked; run in Ray
    Train's local mode, the one place the fake can stand in for Ray's assignment. The model comes back on the
    CPU, holding its thresholds."""
    from dynadapter.adapt import TaskData, build_for_training
    from pipelines.evaluate import _evaluate_on_worker

    to_uint8 = lambda split: ((split[0].clamp(-2, 2) * 60 + 128).to(torch.uint8), split[1])  # noqa: E731
    data = TaskData(None, to_uint8(toy_split(8, 1)), to_uint8(toy_split(12, 2)), 3,
                    norm=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    model = build_for_training(3, BackboneConfig(overrides=TINY), ModelConfig(), train_cfg(), None)
    inputs: list[tuple[str, torch.dtype]] = []
    model.backbone.patch_embed.register_forward_pre_hook(  # what the network itself receives
        lambda m, args: inputs.append((args[0].device.type, args[0].dtype)))
    out = []
    local_mode_fit(lambda config: out.append(_evaluate_on_worker(model, data, budget=0.5)), {}, tmp_path, "eval")
    assert out and 0 <= out[0].test["accuracy"] <= 1 and len(out[0].calibration["thresholds"]) == 4
    # MACs are counted on the CPU first; the val and test passes ran on the accelerator, normalised there
    assert [i for i in inputs if i[0] != "cpu"] == [("meta", torch.float32)] * 2
    assert all(dtype == torch.float32 for _, dtype in inputs)
    assert next(model.parameters()).device.type == "cpu"  # and the model is back where it was


def test_fit_follows_a_strategy_that_moves_the_model(fake_accelerator):
    """`fit` without Ray: a DeepSpeed strategy that places the model on the accelerator; the batches follow.
    (Outside Ray the device is this machine's current CUDA device, which the fake cannot give: named here.)"""
    from dynadapter.adapt import build_for_training
    from dynadapter.train import fit
    from dynadapter.train.deepspeed import deepspeed_strategy

    data = Task(toy_split(16, 0), toy_split(8, 1), 3)
    model = build_for_training(data, BackboneConfig(overrides=TINY), ModelConfig(), train_cfg(), None)
    result = fit(model, data.train, data.val, train_cfg(), strategy=deepspeed_strategy(DeepSpeedConfig(), device=META),
                 progress=False)
    assert next(model.parameters()).device == META and result.best_epoch == 1
    assert set(fake_accelerator) == {("meta", "meta")} and len(fake_accelerator) == 2  # 16 images, batch 8


def test_a_device_picked_by_hand_fails_on_the_fake(fake_accelerator):
    """The fake catches the bug class it is for: `cuda:LOCAL_RANK` chosen by the code itself needs a driver."""
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.zeros(1).to(torch.device("cuda", 0))


def test_labels_left_on_the_cpu_fail_on_the_fake():
    logits = torch.zeros(4, 3, device=META)
    with pytest.raises(RuntimeError, match="device"):
        torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------ which device


def test_a_ray_train_worker_that_sees_cuda_but_requested_no_gpu_stops(monkeypatch):
    """Ray assigned the CPU (no GPU requested) while CUDA is visible: a clear error naming the key to set."""
    import ray.train.torch

    import dynadapter.devices as devices

    monkeypatch.setattr(devices, "_in_ray_train_worker", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device() == torch.device("cpu")  # no GPU anywhere: the CPU, silently
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(GpuNotRequestedError, match=r"tune\.ray\.gpus_per_worker > 0"):
        worker_device("tune.ray.gpus_per_worker")
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 3))
    assert worker_device() == torch.device("cuda", 3)  # Ray's first, not cuda:LOCAL_RANK


def test_a_ray_task_that_sees_cuda_but_requested_no_gpu_stops(ray_session):
    import ray

    def probe():
        import torch

        from dynadapter.devices import GpuNotRequestedError, worker_device

        torch.cuda.is_available = lambda: True  # this worker process only (a fresh one: max_calls=1)
        try:
            return str(worker_device("train.ray.gpus_per_worker"))
        except GpuNotRequestedError as err:
            return f"error: {err}"

    out = ray.get(ray.remote(num_cpus=0.01, max_calls=1)(probe).remote())
    assert out.startswith("error:") and "train.ray.gpus_per_worker > 0" in out


def test_a_gpu_index_is_read_from_cuda_visible_devices(monkeypatch):
    from dynadapter.devices import visible_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_index(6) == 1 and visible_index("4") == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_index(3) == 3  # unrestricted (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): its own index


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_bf16_engine_saves_the_fp32_master_weights(monkeypatch, tmp_path, zero_stage):
    """Under bf16 the engine runs the model (frozen backbone included) in bf16 and keeps fp32 master weights of
    what trains. What a checkpoint and the selected "best" weights keep is that fp32 copy: on the old code they
    were the bf16-rounded parameters. DeepSpeed's CPU accelerator runs the bf16 engine here."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from dynadapter.adapt import build_for_training
    from dynadapter.train import fit, load_checkpoint
    from dynadapter.train.deepspeed import Placement, deepspeed_strategy

    data = Task(toy_split(16, 0), toy_split(8, 1), 3)
    cfg = train_cfg()
    model = build_for_training(data, BackboneConfig(overrides=TINY), ModelConfig(), cfg, None)
    factory = deepspeed_strategy(DeepSpeedConfig(zero_stage=zero_stage, precision="bf16"),
                                 placement=Placement("cpu", "gloo", "bf16"), device="cpu")
    fit(model, data.train, data.val, cfg, strategy=factory, progress=False, checkpoint_path=tmp_path / "ckpt.pt")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the engine cast the whole model
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    for state in (ckpt["model"], ckpt["best"]["state"]):
        weights = {k: v for k, v in state.items() if k in trained}
        assert weights.keys() == trained and {v.dtype for v in weights.values()} == {torch.float32}
        # fp32 values a bf16 tensor cannot hold: the master copy, not the rounded parameters
        assert any(bool((v != v.bfloat16().float()).any()) for v in weights.values())
        # ... and the model holds exactly their bf16 rounding
        own = dict(model.named_parameters())
        assert all(torch.equal(own[k].detach(), v.bfloat16()) for k, v in weights.items())


def test_bf16_gradients_are_averaged_in_fp32():
    from dynadapter.train.deepspeed import Placement, ds_config

    config = ds_config(8, DeepSpeedConfig(precision="bf16"), placement=Placement("cuda", "nccl", "bf16"))
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"


# ------------------------------------------------------------------------------------------ gradient accumulation


def _fit_accumulating(batch_size: int, accumulation: int, q: float = 0.0):
    from dynadapter.adapt import build_for_training
    from dynadapter.config import PriorityConfig
    from dynadapter.train import fit
    from dynadapter.train.deepspeed import deepspeed_strategy

    data = Task(toy_split(64, 0), toy_split(16, 1), 3)
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=1e-2, warmup_epochs=0.5,
                      priority=PriorityConfig(pattern="flat"),
                      sparsity=SparsityConfig(forward=False, p_max=0.0, p_min=0.0, q=q))
    model = build_for_training(data, BackboneConfig(overrides=TINY), ModelConfig(), cfg, None)
    ds = DeepSpeedConfig(precision="fp32", gradient_accumulation_steps=accumulation)
    resamples = []
    import dynadapter.train.sparsity as sparsity

    real = sparsity.GradientMasker.resample

    def counting(self):
        resamples.append(1)
        return real(self)

    sparsity.GradientMasker.resample = counting
    try:
        fit(model, data.train, data.val, cfg, strategy=deepspeed_strategy(ds, device="cpu"), progress=False)
    finally:
        sparsity.GradientMasker.resample = real
    return {k: v for k, v in model.state_dict().items() if "heads" in k or "adapter" in k}, len(resamples)


def test_gradient_accumulation_trains_the_large_batch_model(monkeypatch):
    """2 micro-batches of 8 accumulated into each step train the weights one batch of 16 trains (the mean
    gradient, and an LR schedule that counts optimizer steps); on the old code accumulation was always 1."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    big, _ = _fit_accumulating(16, 1)
    small, _ = _fit_accumulating(8, 2)
    assert big.keys() == small.keys() and big
    diff = max(float((big[k] - small[k]).abs().max()) for k in big)
    assert diff < 1e-5, diff
    _, draws = _fit_accumulating(8, 2, q=0.3)
    assert draws == 2 * 64 // 16  # gradient masks: one draw per optimizer step, not per micro-batch


def test_gradient_accumulation_must_divide_an_epoch(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 must divide the 8 micro-batches"):
        _fit_accumulating(8, 3)
