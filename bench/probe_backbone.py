"""How much does a backbone transfer? A linear probe on its frozen features, train -> val (test never read).

For each backbone (a weights file, or `random` for an untrained ViT of the configured shape): logistic
regression (standardised, C=0.1) on the CLS token and the mean patch token after blocks depth/2 and depth,
fitted on train800 and scored on val200 of every task in base.tasks. Prints per-task val accuracy and the
unweighted suite mean. Needs the prepare stage's outputs (and pretrain's for the default backbone). About
30 s per backbone on the 2-core CPU machine.

    .venv/bin/python bench/probe_backbone.py [models/backbone/backbone.safetensors random ...]
"""

from __future__ import annotations

import argparse
import sys

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dynadapter.adapt import load_task_for
from dynadapter.config import load_params
from dynadapter.models import create_backbone
from dynadapter.train.pretrain import backbone_checkpoint


@torch.no_grad()
def features(vit, x: torch.Tensor) -> torch.Tensor:
    depth = len(vit.blocks)
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    out = []
    for i, block in enumerate(vit.blocks, start=1):
        t = block(t)
        if i in (depth // 2, depth):
            out += [t[:, 0], t[:, vit.num_prefix_tokens:].mean(1)]
    return torch.cat(out, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backbones", nargs="*", help="weights files or `random` (default: the configured backbone "
                    "and random)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    base = params.base
    backbones = args.backbones or [str(backbone_checkpoint(base.backbone, base.paths.models)), "random"]
    data = {t: load_task_for(base, t) for t in base.tasks}
    for name in backbones:
        torch.manual_seed(base.seed)
        vit = create_backbone(base.backbone, None if name == "random" else name).eval()
        scores = {}
        for task, d in data.items():
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
            probe.fit(features(vit, d.train[0]).numpy(), d.train[1].numpy())
            scores[task] = round(float(probe.score(features(vit, d.val[0]).numpy(), d.val[1].numpy())), 3)
        mean = sum(scores.values()) / len(scores)
        print(f"{name}: val acc {scores} suite mean {mean:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
