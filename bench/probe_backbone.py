"""How much does a backbone transfer? A linear probe on its frozen features, train -> val (test never read).

For each backbone (a weights file, or `random` for an untrained ViT of the configured shape): the probe of
`dynadapter.transfer` (standardised logistic regression on the class and mean patch tokens after blocks
depth/2 and depth), fitted on train800 and scored on val200 of every task in base.tasks, plus the same probe
on raw pixels. Prints per-task val accuracy and the unweighted suite mean. Needs the prepare stage's outputs
(and pretrain's for the default backbone). About 30 s per backbone on the 2-core CPU machine.

    .venv/bin/python bench/probe_backbone.py [models/backbone/backbone.safetensors random ...] [--params P]
"""

from __future__ import annotations

import argparse
import sys

import torch

from dynadapter.adapt import load_task_for
from dynadapter.config import load_params
from dynadapter.models import create_backbone
from dynadapter.train.pretrain import backbone_checkpoint
from dynadapter.transfer import backbone_features, probe_accuracy


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
    pixels = {t: round(probe_accuracy(*d.train, *d.val), 3) for t, d in data.items()}
    print(f"pixels: val acc {pixels} suite mean {sum(pixels.values()) / len(pixels):.3f}", flush=True)
    for name in backbones:
        torch.manual_seed(base.seed)
        vit = create_backbone(base.backbone, None if name == "random" else name).eval()
        scores = {t: round(probe_accuracy(backbone_features(vit, d.train[0]), d.train[1],
                                          backbone_features(vit, d.val[0]), d.val[1]), 3) for t, d in data.items()}
        print(f"{name}: val acc {scores} suite mean {sum(scores.values()) / len(scores):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
