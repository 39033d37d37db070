"""Exploration: pretrain a vit_convstem backbone on multi-factor scenes; per-factor val accuracy each epoch."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dynadapter.models  # noqa: F401
from dynadapter.data.upstream import FACTORS, IGNORE, factor_slices, generate_scenes


def to_input(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--factors", default=",".join(FACTORS))
    ap.add_argument("--train", type=int, default=50000)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    Xtr, Ytr = generate_scenes(args.train, 32, seed=0, workers=1)
    Xva, Yva = generate_scenes(2000, 32, seed=0, offset=10_000, workers=1)
    print(f"data {time.time() - t0:.0f}s", flush=True)
    use = [f for f in args.factors.split(",")]
    sl = factor_slices()
    model = timm.create_model("vit_convstem", num_classes=sum(FACTORS.values()), embed_dim=args.dim,
                              num_heads=args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    bs = 128
    steps_per_epoch = len(Xtr) // bs
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    names = list(FACTORS)
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(Xtr), generator=g).numpy()
        te = time.time()
        tot = 0.0
        for k in range(steps_per_epoch):
            idx = np.sort(perm[k * bs:(k + 1) * bs])
            x, y = to_input(Xtr[idx]), torch.from_numpy(Ytr[idx])
            logits = model(x)
            loss = sum(F.cross_entropy(logits[:, sl[f]], y[:, names.index(f)], ignore_index=IGNORE) for f in use)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(to_input(Xva[i:i + 500])) for i in range(0, len(Xva), 500)])
        yv = torch.from_numpy(Yva)
        acc = {}
        for i, f in enumerate(names):
            ok = yv[:, i] != IGNORE
            acc[f] = round(float((logits[ok][:, sl[f]].argmax(1) == yv[ok, i]).float().mean()), 3)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
        save_file(state, str(out / "backbone.safetensors"))
        if epoch % 4 == 0:
            save_file(state, str(out / f"backbone_e{epoch}.safetensors"))
        rec = {"epoch": epoch, "loss": round(tot / steps_per_epoch, 4), "val": acc, "sec": round(time.time() - te)}
        print(json.dumps(rec), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
