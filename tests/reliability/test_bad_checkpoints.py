"""Corrupt, truncated, unsafe and mismatched checkpoints, for the three files the project reads back: the
backbone weights (models/backbone.py), a trained task's adapter (adapt.load_trained) and the trainer's resume
checkpoint (train/loop.py). Each is refused with an error naming the file and, for a mismatch, the keys and
shapes; nothing is half-loaded, and no pickled code runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynadapter.adapt import ADAPTER_FILE, ADAPTER_INFO, Trained, load_trained, save_trained
from dynadapter.config import ModelConfig, PetlConfig, TrainConfig
from dynadapter.models import create_backbone
from dynadapter.models.backbone import CheckpointError, load_backbone_weights
from dynadapter.train import CheckpointMismatchError, fit, fit_resumable, load_checkpoint, trainable_state
from helpers import backbone_cfg, one_thread, randomize_petl, tiny_model  # noqa: F401


class Payload:
    """A pickle that runs code when loaded unsafely: it creates the file named in it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ------------------------------------------------------------------------------------------ backbone weights


def _backbone_file(tmp_path: Path, suffix: str) -> Path:
    vit = create_backbone(backbone_cfg())
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == ".npz":
        np.savez(path, **{"Transformer/encoderblock_0/LayerNorm_0/scale": np.ones(32, np.float32)})
    else:
        torch.save(state, path)
    return path


def _truncated(suffix):
    return lambda tmp: truncate(_backbone_file(tmp, suffix))


def _empty(tmp):
    (tmp / "vit.pth").write_bytes(b"")
    return tmp / "vit.pth"


def _text(tmp):
    (tmp / "vit.bin").write_text("git-lfs pointer: version https://git-lfs.github.com/spec/v1\n")
    return tmp / "vit.bin"


def _not_a_state_dict(tmp):
    torch.save([torch.zeros(3)], tmp / "vit.pt")
    return tmp / "vit.pt"


def _unsafe_pickle(tmp):
    torch.save({"pos_embed": Payload(str(tmp / "pwned"))}, tmp / "vit.pth")
    return tmp / "vit.pth"


BACKBONE_CASES = {  # how the file is damaged -> what the message says besides the file name
    "truncated-pth": (_truncated(".pth"), "cannot read checkpoint"),
    "truncated-safetensors": (_truncated(".safetensors"), "cannot read checkpoint"),
    "truncated-npz": (_truncated(".npz"), "cannot read checkpoint"),
    "empty-file": (_empty, "cannot read checkpoint"),
    "lfs-pointer-text": (_text, "cannot read checkpoint"),
    "not-a-state-dict": (_not_a_state_dict, "not a state dict of tensors"),
    "unsafe-pickle": (_unsafe_pickle, "cannot read checkpoint (UnpicklingError"),
}


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_unreadable_backbone_weights_name_the_file(tmp_path, case):
    make, reason = BACKBONE_CASES[case]
    path = make(tmp_path)
    model = create_backbone(backbone_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(model, path)
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value), str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "pwned").exists()  # the pickled payload never ran


def test_backbone_checkpoint_with_another_classifier_loads_without_it(tmp_path):
    """A pretrained file with a 1000-class classifier: the backbone has none (num_classes=0), so the head's
    keys are dropped, not reported as a mismatch. (Other architectures: tests/test_models.py::
    test_backbone_checkpoint_loading.)"""
    import timm

    torch.manual_seed(3)
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000,
                             **backbone_cfg().overrides)
    path = tmp_path / "in1k.pth"
    torch.save(full.state_dict(), path)
    model = create_backbone(backbone_cfg(), path)
    assert torch.equal(model.pos_embed, full.pos_embed)


# ------------------------------------------------------------------------------------------ trained adapters


@pytest.fixture()
def saved(tmp_path):
    """A trained (randomised) 3-class adapter model saved as the train stage saves it, on a backbone file."""
    bcfg, mcfg = backbone_cfg(), ModelConfig(petl=PetlConfig(method="adapter"))
    model = tiny_model("adapter", num_classes=3, seed=0)
    randomize_petl(model, 0)
    torch.manual_seed(0)  # the same draws as tiny_model's backbone: the weights it was trained on
    backbone = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone(bcfg).state_dict().items()}, str(backbone))
    trained = Trained(task="count", method="adapter", early_exit=True, exits=list(model.exits),
                      params={"trainable": 1}, best_epoch=1, train_seconds=0.0, step_seconds=0.0)
    out = save_trained(model, trained, tmp_path / "count" / "adapter", backbone_cfg=bcfg, model_cfg=mcfg,
                       num_classes=3)
    return dict(model=model, out=out, backbone=backbone, tmp=tmp_path)


def _replace_weights(saved, other) -> None:
    save_file({k: v.contiguous() for k, v in trainable_state(other).items()}, str(saved["out"] / ADAPTER_FILE))


def _edit_info(saved, **changes) -> None:
    info = json.loads((saved["out"] / ADAPTER_INFO).read_text())
    info.update(changes)
    (saved["out"] / ADAPTER_INFO).write_text(json.dumps(info))


ADAPTER_CASES = {  # damage -> (file named, fragments of the message)
    "truncated-weights": (lambda s: truncate(s["out"] / ADAPTER_FILE), ADAPTER_FILE,
                          ["unreadable trained weights", "SafetensorError"]),
    "missing-weights": (lambda s: (s["out"] / ADAPTER_FILE).unlink(), ADAPTER_FILE, ["unreadable trained weights"]),
    "weights-of-5-classes": (lambda s: _replace_weights(s, tiny_model("adapter", num_classes=5)), ADAPTER_FILE,
                             ["heads.0.fc.weight: checkpoint (5, ", "vs model (3, "]),
    "weights-of-another-petl": (lambda s: _replace_weights(s, tiny_model("lora", num_classes=3)), ADAPTER_FILE,
                                ["unexpected ['backbone.blocks.0.attn.qkv.down.weight'",
                                 "missing ['backbone.blocks.0.mlp.down.weight'"]),
    "weights-of-another-width": (lambda s: _replace_weights(s, tiny_model("adapter", num_classes=3, embed_dim=24)),
                                 ADAPTER_FILE,
                                 ["shape mismatches", "blocks.0.mlp.down.weight: checkpoint (8, 24) vs model (8, 32)"]),
    "json-says-5-classes": (lambda s: _edit_info(s, num_classes=5), ADAPTER_FILE,
                            ["fc.weight: checkpoint (3, ", "vs model (5, "]),
    "truncated-json": (lambda s: truncate(s["out"] / ADAPTER_INFO), ADAPTER_INFO,
                       ["unreadable trained-model description", "JSONDecodeError"]),
    "json-with-unknown-method": (lambda s: _edit_info(s, model={"petl": {"method": "prefix"}}), ADAPTER_INFO,
                                 ["ValidationError", "petl.method"]),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_damaged_trained_adapter_names_file_keys_and_shapes(saved, case):
    damage, name, fragments = ADAPTER_CASES[case]
    restored, _, _ = load_trained(saved["out"], saved["backbone"])  # intact: loads
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(restored(x), saved["model"].eval()(x)))
    damage(saved)
    with pytest.raises(CheckpointMismatchError) as err:
        load_trained(saved["out"], saved["backbone"])
    message = str(err.value)
    assert message.startswith(f"{saved['out'] / name}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_trained_adapter_on_a_backbone_of_another_architecture(saved):
    other = saved["tmp"] / "deeper.safetensors"
    deeper = create_backbone(backbone_cfg(depth=6))
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(other))
    with pytest.raises(CheckpointError) as err:
        load_trained(saved["out"], other)
    assert str(err.value).startswith(f"{other}: ") and "unexpected keys" in str(err.value)
    assert "blocks.4.attn.qkv.weight" in str(err.value)


# ------------------------------------------------------------------------------------------ trainer checkpoint


def _data(num_classes: int, n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, num_classes, (n,), generator=g)


CFG = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0)


@pytest.fixture()
def resume_ckpt(tmp_path):
    """A 3-class adapter run interrupted after epoch 1 of 2 (its checkpoint on disk)."""
    path = tmp_path / "run" / "last.pt"
    fit(tiny_model("adapter", num_classes=3), _data(3), None, CFG.model_copy(update={"epochs": 1}),
        checkpoint_path=path, progress=False)
    return path


def _unsafe(path: Path) -> None:
    torch.save({"format": "x", "model": Payload(str(path.parent / "pwned"))}, path)


TRAINER_FILE_CASES = {
    "truncated": (lambda p: truncate(p), "unreadable trainer checkpoint (RuntimeError"),
    "empty": (lambda p: p.write_bytes(b""), "unreadable trainer checkpoint (EOFError"),
    "unsafe-pickle": (_unsafe, "unreadable trainer checkpoint (UnpicklingError"),
    "not-ours": (lambda p: torch.save({"epoch": 1}, p), "not a dynadapter trainer checkpoint"),
}


@pytest.mark.parametrize("case", TRAINER_FILE_CASES)
def test_unreadable_trainer_checkpoint_names_the_file_and_resume_starts_over(resume_ckpt, capsys, case):
    damage, reason = TRAINER_FILE_CASES[case]
    damage(resume_ckpt)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(resume_ckpt)
    assert str(err.value).startswith(f"{resume_ckpt}: ") and reason in str(err.value), str(err.value)
    assert not (resume_ckpt.parent / "pwned").exists()
    # the pipelines' resume: a checkpoint it cannot use is reported, replaced, and training starts over
    res = fit_resumable(tiny_model("adapter", num_classes=3), _data(3), None, CFG.model_copy(update={"epochs": 1}),
                        checkpoint_path=resume_ckpt, progress=False)
    assert res.resumed_from is None and len(res.history) == 1
    assert f"note: {resume_ckpt}: " in capsys.readouterr().err
    assert load_checkpoint(resume_ckpt)["epoch"] == 1


@pytest.mark.parametrize("model_kwargs, fragments", [
    (dict(method="adapter", num_classes=5),
     ["shape mismatches", "heads.0.fc.weight: checkpoint (3, ", "vs model (5, "]),
    (dict(method="lora", num_classes=3), ["unexpected ['backbone.blocks.0.mlp", "missing ['backbone.blocks.0.attn"]),
])
def test_resuming_onto_another_model_names_file_keys_and_shapes(resume_ckpt, model_kwargs, fragments):
    """Same train config and seed, another model (classes, PETL method): the resume is refused before any
    weight is copied."""
    model = tiny_model(**model_kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        fit(model, _data(model_kwargs["num_classes"]), None, CFG.model_copy(update={"epochs": 1}),
            checkpoint_path=resume_ckpt, progress=False)
    message = str(err.value)
    assert message.startswith(f"{resume_ckpt}: checkpoint state does not fit the model"), message
    for fragment in fragments:
        assert fragment in message, message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
