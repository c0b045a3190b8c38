"""CONCH v1.5's vision tower (Mahmood Lab; TITAN's patch encoder): a ViT-L/16 at 448 px whose embedding is not a
token but a learned query's attention over all tokens (CoCa's attentional pooler), then a LayerNorm: 768-d.

The module and parameter names are those of the published ``pytorch_model_vision.bin``, as the owners' code builds
it (``EncoderWithAttentionalPooler``: ``trunk`` a timm-style ViT, ``attn_pool_contrast`` the pooler with ``query``,
``ln_q``, ``ln_k``, ``to_q``, ``to_kv``, ``to_out``, 8 heads, no biases; ``ln_contrast``), so the file loads
strictly. The trunk is timm's own VisionTransformer: its tensors have timm's names in the owners' code too.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AttentionalPooler", "ConchV15Vision"]


class AttentionalPooler(nn.Module):
    """Learned queries attend over the tokens (multi-head, scaled dot product, no biases); each query's answer is
    one pooled vector. ``ln_q`` normalises the queries before ``to_q``, ``ln_k`` the tokens before ``to_kv``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, context_dim) -> (batch, queries, d_model)."""
        query = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)
        key, value = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        query, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (query, key, value))
        pooled = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(pooled.transpose(1, 2).flatten(2))


class ConchV15Vision(nn.Module):
    """The trunk's tokens for segmentation (``forward_features``: 1024-d, class token first) and the pooled
    768-d embedding (``pool``), as ``hepatoquant.encoders.Encoder`` asks of a backbone."""

    def __init__(self) -> None:
        super().__init__()
        # ConchConfig: patch 16, context_dim 1024, depth 24, 16 heads, MLP ratio 4, qkv bias, LayerScale 1e-6;
        # 448 px (TRIDENT builds it at 448; the position table of the file is 28 x 28 + 1).
        self.trunk = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=448, patch_size=16,
                                       init_values=1e-6, num_classes=0, dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)
        self.num_prefix_tokens = 1
        self.embed_dim = 1024  # of the tokens (the segmenter's decoder reads them)
        self.dynamic_img_size = True

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
