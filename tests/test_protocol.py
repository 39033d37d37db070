"""train.protocol: `select` (train800, select on val200) and `standard` (the VTAB-1k papers': the epoch count
chosen on val200, then a fresh model on train800val200 reported on test, thresholds calibrated on val200 with
a threshold donor trained on train800 only on the final run's schedule)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from dynadapter.adapt import (CALIBRATION_DIR, TaskData, evaluate_task, load_trained, retrain_for_calibration,
                              retrain_on_trainval, train_task, trainval_data)
from dynadapter.config import DeepSpeedConfig, ModelConfig, TrainConfig, parse_params
from dynadapter.data.store import write_task
from helpers import TINY, backbone_cfg, one_thread  # noqa: F401 - one_thread: autouse fixture
from pipelines import evaluate as evaluate_stage
from pipelines import train as train_stage

TRAIN = TrainConfig(epochs=3, batch_size=8, lr=0.01, warmup_epochs=0.0)


def random_task(n_train: int = 16, n_val: int = 8, n_test: int = 8, classes: int = 3, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g)

    return TaskData(split(n_train), split(n_val), split(n_test), classes)


def test_trainval_data_is_train_then_val_without_validation():
    data = random_task()
    tv = trainval_data(data)
    assert tv.val is None and tv.test is data.test and tv.num_classes == 3
    assert torch.equal(tv.train[0], torch.cat([data.train[0], data.val[0]]))
    assert torch.equal(tv.train[1], torch.cat([data.train[1], data.val[1]]))


def test_retrain_runs_the_selected_epoch_count_on_train800val200():
    data = random_task()
    model_cfg = ModelConfig()
    selected, _ = train_task("t", data, backbone_cfg(), model_cfg, TRAIN, None, progress=False)
    selected.best_epoch = 2  # whatever val chose: the retrain follows it
    final, _ = retrain_on_trainval("t", data, backbone_cfg(), model_cfg, TRAIN, None, selected, progress=False)
    assert len(final.history) == 2 and final.best_epoch == 2
    assert [h["steps"] for h in final.history] == [3, 3]  # 24 images in batches of 8: train800 + val200
    assert all("val_acc" not in h for h in final.history)  # nothing was selected on val


def test_a_run_resumed_from_its_finished_checkpoint_keeps_its_training_time(tmp_path):
    """`make repro` after a code change returns from the finished epoch checkpoints in a second; the train
    stage's train_seconds then said 0.0. The restored epochs count at the time they took."""
    data = random_task()
    ckpt = tmp_path / "run.pt"
    first, _ = train_task("t", data, backbone_cfg(), ModelConfig(), TRAIN, None, checkpoint_path=ckpt,
                          progress=False)
    again, _ = train_task("t", data, backbone_cfg(), ModelConfig(), TRAIN, None, checkpoint_path=ckpt,
                          progress=False)
    epochs = sum(h["seconds"] for h in first.history)
    assert again.history == first.history and epochs > 0
    assert epochs <= again.train_seconds < epochs + first.train_seconds  # restored epochs + reading them back


def test_final_schedule_keeps_the_warm_up_share_so_a_short_run_is_not_all_warm_up():
    """ViT-B/16 preset: warm-up 10 of 100 epochs; a selected epoch 8 made the whole final run warm-up (the lr
    still rising at its last step). The warm-up now keeps its share of the run: 0.8 of 8 epochs."""
    from dynadapter.adapt import final_schedule
    from dynadapter.train import warmup_cosine, warmup_steps_for

    cfg = TrainConfig(epochs=100, warmup_epochs=10.0, batch_size=8)
    final = final_schedule(cfg, 8)
    assert final.epochs == 8 and final.warmup_epochs == pytest.approx(0.8)
    steps_per_epoch = 100
    warmup = warmup_steps_for(final, steps_per_epoch)
    total = final.epochs * steps_per_epoch
    lrs = [warmup_cosine(s, warmup, total) for s in range(total)]
    assert warmup == 80 and max(lrs) == pytest.approx(lrs[warmup]) and lrs[-1] < 0.01  # warm-up, then annealed
    unscaled = cfg.model_copy(update={"epochs": 8})  # what the final run used to get
    assert warmup_steps_for(unscaled, steps_per_epoch) == total  # all warm-up: the edge case this fixes
    assert final_schedule(TrainConfig(epochs=20, warmup_epochs=1.0), 20).warmup_epochs == 1.0  # full length: as before


def test_standard_thresholds_come_from_the_donor_on_val():
    data = random_task(seed=1)
    model_cfg = ModelConfig()
    selected, _ = train_task("t", data, backbone_cfg(), model_cfg, TRAIN, None, progress=False)
    selected.best_epoch = 2
    _, final_model = retrain_on_trainval("t", data, backbone_cfg(), model_cfg, TRAIN, None, selected,
                                         progress=False, seed=5)
    donor, donor_model = retrain_for_calibration("t", data, backbone_cfg(), model_cfg, TRAIN, None, selected,
                                                 progress=False, seed=5)
    assert [h["steps"] for h in donor.history] == [2, 2]  # train800 only (16 images), the final run's 2 epochs
    alone = evaluate_task(donor_model, data, budget=0.5)
    ev = evaluate_task(final_model, data, budget=0.5, calibration_model=donor_model)
    assert ev.calibration == alone.calibration and ev.calibrated_on == "val200, threshold donor (train800 only)"
    assert final_model.thresholds == pytest.approx(alone.calibration["thresholds"])
    own = evaluate_task(final_model, data, budget=0.5)
    assert own.calibrated_on == "val200"
    assert ev.test != alone.test or ev.test_exit_accuracy != alone.test_exit_accuracy  # another model on test


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _stage_params(tmp_path, protocol: str):
    """A prepared 3-class task and a random tiny backbone file; the params the stages run with."""
    rng = np.random.default_rng(0)
    sizes = {"train": 12, "val": 6, "test": 6}
    splits = [s for s, n in sizes.items() for _ in range(n)]
    write_task(tmp_path / "data", "toy", [_png(rng) for _ in splits], [i % 3 for i in range(len(splits))], splits,
               3, source="test")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    return parse_params({
        "base": {"paths": {k: str(tmp_path / k) for k in ("data", "models", "outputs")},
                 "tasks": ["toy"],
                 "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "vit.safetensors"),
                              "overrides": TINY}},
        "train": {"epochs": 2, "batch_size": 6, "lr": 0.01, "protocol": protocol},
        "evaluate": {"throughput_batch": 0},
    })


@pytest.mark.parametrize("protocol", ["select", "standard"])
def test_train_and_evaluate_stages_follow_the_protocol(tmp_path, protocol):
    params = _stage_params(tmp_path, protocol)
    summary = train_stage.run(params, None, stdout=io.StringIO())
    saved = tmp_path / "models/tasks/toy"
    for variant in ("dyn", "baseline"):
        info = json.loads((saved / variant / "adapter.json").read_text())
        row = summary["tasks"]["toy"][variant]
        assert (row["protocol"], row["trained_on"]) == (protocol, {"select": "train800",
                                                                    "standard": "train800val200"}[protocol])
        assert (saved / variant / CALIBRATION_DIR).is_dir() == (protocol == "standard")
        if protocol == "standard":  # 18 images in batches of 6, for the epochs val chose; no val metrics
            assert [h["steps"] for h in info["trained"]["history"]] == [3] * row["best_epoch"]
            # the threshold donor: train800 only (12 images: 2 steps), on the final run's schedule, no val
            donor = json.loads((saved / variant / CALIBRATION_DIR / "adapter.json").read_text())["trained"]
            assert [h["steps"] for h in donor["history"]] == [2] * row["best_epoch"]
            assert all("val_acc" not in h for h in donor["history"])
    metrics, per_task, _ = evaluate_stage.run(params)
    want = "val200, threshold donor (train800 only)" if protocol == "standard" else "val200"
    assert per_task["toy"]["dyn"]["calibrated_on"] == want
    if protocol == "standard":
        sel_model = load_trained(saved / "dyn" / CALIBRATION_DIR, tmp_path / "vit.safetensors")[0]
        from dynadapter.adapt import load_task_for

        alone = evaluate_task(sel_model, load_task_for(params.base, "toy"), budget=params.base.budget,
                              **evaluate_stage.guarantee_kwargs(params.evaluate))
        assert per_task["toy"]["dyn"]["calibration"]["thresholds"] == alone.calibration["thresholds"]


def test_train_stage_trains_through_deepspeed_on_a_gpu(tmp_path, monkeypatch):
    """On a CUDA machine the train stage takes the tune trials' path: a DeepSpeed engine (NCCL, bf16 where the
    GPU supports it); on the CPU plain AdamW. (The GPU itself is not exercised here: the factory is spied on.)"""
    import dynadapter.adapt as adapt
    from dynadapter.train.deepspeed import DeepSpeedStrategy, Placement, resolve_placement
    from dynadapter.train.optim import AdamWStrategy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert adapt.accelerator_strategy() is None and adapt.accelerator() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    factory = adapt.accelerator_strategy()
    assert factory.func is DeepSpeedStrategy and factory.keywords == {"ds": None, "placement": None, "device": None}
    zero2 = DeepSpeedConfig(zero_stage=2)
    assert adapt.accelerator_strategy(zero2).keywords["ds"] is zero2  # train.deepspeed reaches the engine
    assert resolve_placement("auto", cuda=True, bf16_supported=True) == Placement("cuda", "nccl", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the run below is on the CPU

    used = []

    def spy(model, cfg, steps_per_epoch):
        used.append(steps_per_epoch)
        return AdamWStrategy(model, cfg, steps_per_epoch)

    monkeypatch.setattr(adapt, "accelerator_strategy", lambda ds=None: spy)
    params = _stage_params(tmp_path, "standard")
    train_stage.run(params, None, stdout=io.StringIO())
    assert used == [2, 3, 2] * 2  # dyn: train800, train800val200, the donor on train800; baseline: the same
