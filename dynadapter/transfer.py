"""How much a frozen backbone transfers: linear probes on its features against a random-init backbone and raw pixels.

Each probe is a standardised logistic regression fitted on train and scored on val (test is never read). The
backbone's features are the class token and the mean patch token after the middle and the last block, so a
probe sees both what early exits and what the last exit work with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

PROBE_C = 0.1  # inverse L2 strength, fixed (not tuned on val: the probe reports, it does not select)


@torch.no_grad()
def backbone_features(vit: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """[N, 4D] class token and mean patch token after block depth/2 and after the last block (eval mode)."""
    was_training = vit.training
    vit.eval()
    depth = len(vit.blocks)
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x[i:i + batch_size])))
            feats = []
            for b, block in enumerate(vit.blocks, start=1):
                t = block(t)
                if b in (depth // 2, depth):
                    prefix = vit.num_prefix_tokens
                    feats += [t[:, 0] if prefix else t.mean(1), t[:, prefix:].mean(1)]
            out.append(torch.cat(feats, 1))
    finally:
        vit.train(was_training)
    return torch.cat(out)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
    """Val accuracy of a standardised logistic regression fitted on (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=PROBE_C))
    probe.fit(train_x.reshape(len(train_x), -1).numpy(), train_y.numpy())
    return float(probe.score(val_x.reshape(len(val_x), -1).numpy(), val_y.numpy()))


PROBES = ("probe_val", "random_init_probe_val", "pixel_probe_val")


def _margin(probes: Mapping[str, float]) -> float:
    """How far the backbone's probe is above the better of the two references."""
    return probes["probe_val"] - max(probes["random_init_probe_val"], probes["pixel_probe_val"])


def _summary(tasks: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The unweighted task means of each probe, and the margin of the backbone over the better reference."""
    out = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in PROBES}
    return {**out, "margin": _margin(out)}


@dataclass(frozen=True)
class TransferReport:
    probe_val: float  # suite mean of the probe on the backbone's frozen features
    random_init_probe_val: float  # the same probe on a randomly initialised backbone of the same shape
    pixel_probe_val: float  # the same probe on the raw (normalised) pixels
    tasks: dict[str, dict[str, float]]
    groups: dict[str, list[str]] = field(default_factory=dict)  # e.g. shared / unseen: task names

    @property
    def margin(self) -> float:
        """How far the backbone's probe is above the better of the two references."""
        return _margin({k: getattr(self, k) for k in PROBES})

    def group_summaries(self) -> dict[str, dict]:
        """Per group of tasks: its tasks, the mean of each probe and the margin (a group with no task is left out)."""
        return {g: {"tasks": list(names), **_summary({t: self.tasks[t] for t in names})}
                for g, names in self.groups.items() if names}

    def to_dict(self) -> dict:
        out = {"probe_val": self.probe_val, "random_init_probe_val": self.random_init_probe_val,
               "pixel_probe_val": self.pixel_probe_val, "margin": self.margin, "tasks": self.tasks}
        if self.groups:
            out["groups"] = self.group_summaries()
        return out


def transfer_report(pretrained: nn.Module, random_init: nn.Module, data: Mapping[str, object],
                    groups: Mapping[str, Sequence[str]] | None = None) -> TransferReport:
    """Probe every task of `data` ({task: TaskData with .train and .val (images, labels)}) three ways; `groups`
    ({name: tasks}) adds each group's means and margin (the embedded suite: tasks that share a pretraining factor
    and tasks that do not)."""
    tasks: dict[str, dict[str, float]] = {}
    for task, d in data.items():
        (xtr, ytr), (xva, yva) = d.train, d.val
        tasks[task] = {
            "probe_val": probe_accuracy(backbone_features(pretrained, xtr), ytr, backbone_features(pretrained, xva), yva),
            "random_init_probe_val": probe_accuracy(backbone_features(random_init, xtr), ytr,
                                                    backbone_features(random_init, xva), yva),
            "pixel_probe_val": probe_accuracy(xtr, ytr, xva, yva),
        }
    s = _summary(tasks)
    return TransferReport(s["probe_val"], s["random_init_probe_val"], s["pixel_probe_val"], tasks,
                          {g: list(names) for g, names in (groups or {}).items()})
