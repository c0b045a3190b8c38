"""Published checkpoints saved by Hugging Face ``transformers`` (Phikon: ``ViTModel``; Phikon-v2: ``Dinov2Model``)
renamed into timm's ``VisionTransformer`` names, so that every registered encoder is one timm model.

Why not build those two with ``transformers``: the segmenter's LoRA, the token pooling, ``dynamic_img_size`` and
the strict loading all work on timm's modules, and transformers 5 renamed DINOv2's attention tensors
(``attention.attention.query`` -> ``attention.q_proj``) while the published files keep the old names. The
renaming is exact: separate query/key/value projections are stacked in timm's fused ``qkv`` order (q, k, v),
LayerScale's ``lambda1`` is timm's ``gamma``; what timm's model has no use for (ViT's pooler, DINOv2's training
mask token) is dropped by name, never silently: any other key is left as it is and refused by the strict load.
tests/test_checkpoint_layouts.py compares the renamed weights' outputs with transformers' own models.
"""

from __future__ import annotations

import re

import torch

__all__ = ["CHECKPOINT_LAYOUTS", "to_timm_names"]

CHECKPOINT_LAYOUTS = ("timm", "transformers_vit", "transformers_dinov2")

# Keys the timm model does not have and the embedding does not use.
_UNUSED = {
    "transformers_vit": re.compile(r"^pooler\.dense\.(weight|bias)$"),  # ViTModel's tanh pooler (not the CLS token)
    "transformers_dinov2": re.compile(r"^embeddings\.mask_token$"),  # masked-image training only
}
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Per block, the part after "encoder.layer.{i}." -> the part after "blocks.{i}."
_BLOCK = {
    "transformers_vit": {
        "layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    },
    "transformers_dinov2": {
        "norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2", "layer_scale1": "ls1", "layer_scale2": "ls2",
        "attention.o_proj": "attn.proj",  # transformers 5's name for the same projection
    },
}
_LAYER = re.compile(r"^encoder\.layer\.(?P<block>\d+)\.(?P<module>.+)\.(?P<param>weight|bias|lambda1)$")
_QKV = re.compile(r"^attention\.(attention\.(?P<old>query|key|value)|(?P<new>q|k|v)_proj)$")
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def to_timm_names(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``state_dict`` in timm's names; ``layout`` says how it was saved (:data:`CHECKPOINT_LAYOUTS`)."""
    if layout not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {CHECKPOINT_LAYOUTS}")
    if layout == "timm":
        return state_dict
    renamed: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        if _UNUSED[layout].match(key):
            continue
        if key in _EMBEDDINGS:
            renamed[_EMBEDDINGS[key]] = tensor
            continue
        match = _LAYER.match(key)
        if match is None:
            renamed[key] = tensor  # not a transformers name we know: the strict load names it
            continue
        block, module, param = int(match["block"]), match["module"], match["param"]
        qkv = _QKV.match(module)
        if qkv is not None and param in ("weight", "bias"):
            qkv_parts.setdefault((block, param), {})[_QKV_ORDER[qkv["old"] or qkv["new"]]] = (key, tensor)
        elif module in _BLOCK[layout]:
            renamed[f"blocks.{block}.{_BLOCK[layout][module]}.{'gamma' if param == 'lambda1' else param}"] = tensor
        else:
            renamed[key] = tensor
    for (block, param), parts in qkv_parts.items():
        if sorted(parts) == [0, 1, 2]:
            renamed[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[i][1] for i in range(3)], dim=0)
        else:  # left as they are: the strict load names them and the fused tensor they cannot make
            renamed.update(parts.values())
    return renamed
