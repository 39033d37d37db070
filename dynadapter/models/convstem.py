"""`vit_convstem`: a timm VisionTransformer whose patchify layer is a small convolutional stem.

Plain ViTs trained from scratch on little data optimise badly; a few stride-2 convolutions in place of the
single patchify convolution fix most of it (Xiao et al. 2021, "Early Convolutions Help Transformers See
Better"). The model is registered in timm's registry, so `timm.create_model("vit_convstem", ...)`, the
backbone config (`base.backbone.name`) and checkpoints all go through the same path as any timm ViT.

The stem uses GroupNorm, not BatchNorm: a frozen backbone is put in train mode while its adapters train, and
BatchNorm would then keep updating its running statistics, silently changing the "frozen" weights.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ConvStem(nn.Module):
    """log2(patch_size) conv3x3 stride-2 + GroupNorm + GELU stages, then a 1x1 conv to `embed_dim`.

    Channels double per stage from `embed_dim / 2**(stages-1)` up to `embed_dim`. `in_channels` is exposed as
    a patchify conv's would be (callers read `patch_embed.proj.in_channels`).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, bias: bool = True):
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2**stages != patch_size or stages < 1:
            raise ValueError(f"vit_convstem needs a power-of-two patch_size >= 2, got {patch_size}")
        self.in_channels = in_chans
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = max(8, embed_dim // 2 ** (stages - 1 - i))
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class ConvStemEmbed(PatchEmbed):
    """timm's PatchEmbed (same geometry, flattening and checks) with the projection replaced by a ConvStem."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj = ConvStem(self.proj.in_channels, self.proj.out_channels, self.patch_size[0], self.proj.bias is not None)


def _cfg() -> dict:
    # Inputs are normalised to [-1, 1] like timm's ViT defaults; no pretrained weights live on any hub.
    return {"url": "", "num_classes": 0, "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj.layers.0", "classifier": "head"}


@register_model
def vit_convstem(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Small ViT with a convolutional stem (defaults: 32 px, stride 8 -> 16 tokens, width 96, 12 blocks)."""
    if pretrained:
        raise ValueError("vit_convstem has no hub weights; pass a local file as base.backbone.checkpoint")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's hub plumbing
        kwargs.pop(key, None)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 12, "num_heads": 3, **kwargs}
    model = VisionTransformer(embed_layer=ConvStemEmbed, **args)
    model.pretrained_cfg = {**_cfg(), "input_size": (3, *([args["img_size"]] * 2 if isinstance(args["img_size"], int)
                                                          else args["img_size"]))}
    return model
