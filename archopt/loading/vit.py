"""ViT / DeiT checkpoints from timm (``vit_*_patch16_224``, ``deit_tiny_patch16_224``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from archopt.loading.keymap import rename_keys

_WB = r"(weight|bias)"


def vit_from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys (class-token models) -> archopt ``VisionTransformer``.

    Our encoder layers use timm's slot names, so only the patch embedding and the head move.
    Distilled DeiT (``dist_token``, ``head_dist``) and register tokens have no counterpart here
    and raise.
    """
    rules = [
        (r"(cls_token|pos_embed)", r"\1"),
        (rf"patch_embed\.proj\.{_WB}", r"patch_embed.\1"),
        (
            rf"(blocks\.\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_WB}",
            r"\1.\2.\3",
        ),
        (rf"norm\.{_WB}", r"norm.\1"),
        (rf"head\.{_WB}", r"classifier.\1"),
    ]
    return rename_keys(state_dict, rules, source="timm ViT")
