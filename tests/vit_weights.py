"""A timm VisionTransformer's weights written as Google's original ViT `.npz` (the layout of
storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz, which timm's `_load_weights` reads), so tests can
stand in for the real IN-21k file with random weights; and in big_vision's stacked layout (`save_big_vision_npz`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from timm.models.vision_transformer import VisionTransformer


def vit_to_npz(vit: VisionTransformer) -> dict[str, np.ndarray]:
    """`vit`'s backbone weights under the original ViT names and axis orders (JAX/Flax: kernels [in, out],
    convolutions HWIO, attention split per head). No classifier: timm ignores `head/*` for num_classes=0."""
    d = vit.embed_dim
    heads = vit.blocks[0].attn.num_heads
    t = lambda x: x.detach().float().cpu().numpy()  # noqa: E731
    w = {
        "embedding/kernel": t(vit.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": t(vit.patch_embed.proj.bias),
        "cls": t(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": t(vit.pos_embed),
        "Transformer/encoder_norm/scale": t(vit.norm.weight),
        "Transformer/encoder_norm/bias": t(vit.norm.bias),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        for name, wq, bq in zip(("query", "key", "value"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = t(wq.T.reshape(d, heads, -1))
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = t(bq.reshape(heads, -1))
        out_kernel = blk.attn.proj.weight.reshape(d, heads, -1).permute(1, 2, 0)  # [heads, head_dim, D]
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = t(out_kernel)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight.T)
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    return w


def save_google_npz(vit: VisionTransformer, path: str | Path) -> Path:
    """`vit` written as a Google ViT .npz file (`vit_to_npz`)."""
    path = Path(path)
    np.savez(path, **vit_to_npz(vit))
    return path


_BIG_VISION_BLOCK_NAMES = {  # per-block sub-module names: original ViT -> big_vision
    "LayerNorm_0": "LayerNorm_0",
    "LayerNorm_2": "LayerNorm_1",
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "MlpBlock_3": "MlpBlock_0",
}


def save_big_vision_npz(vit: VisionTransformer, path: str | Path, prefix: str = "params/") -> Path:
    """`vit` in big_vision's layout: `params/` prefix, `pos_embedding` at the top, and the encoder blocks
    stacked along a leading depth axis (`Transformer/encoderblock/...`, from `nn.scan`)."""
    flat = vit_to_npz(vit)
    out = {
        f"{prefix}embedding/kernel": flat["embedding/kernel"],
        f"{prefix}embedding/bias": flat["embedding/bias"],
        f"{prefix}cls": flat["cls"],
        f"{prefix}pos_embedding": flat["Transformer/posembed_input/pos_embedding"],
        f"{prefix}Transformer/encoder_norm/scale": flat["Transformer/encoder_norm/scale"],
        f"{prefix}Transformer/encoder_norm/bias": flat["Transformer/encoder_norm/bias"],
    }
    first = "Transformer/encoderblock_0/"
    block0 = [k.removeprefix(first) for k in flat if k.startswith(first)]
    for name in block0:
        module, _, rest = name.partition("/")
        stacked = np.stack([flat[f"Transformer/encoderblock_{i}/{name}"] for i in range(len(vit.blocks))])
        out[f"{prefix}Transformer/encoderblock/{_BIG_VISION_BLOCK_NAMES[module]}/{rest}"] = stacked
    path = Path(path)
    np.savez(path, **out)
    return path
