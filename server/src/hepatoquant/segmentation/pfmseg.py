"""The decoder of PFM_Segmentation (github.com/lingxitong/PFM_Segmentation), so its trained segmenters run here.

Their model lays the backbone's patch tokens (class and register tokens dropped, after the backbone's final norm)
back on their grid and decodes them with a ``DecoderCup``: a 3x3 conv-BN-ReLU from the token width to 512, then
four blocks of (bilinear upsampling with ``align_corners=True``, two 3x3 conv-BN-ReLU) down to channels
(256, 128, 64, 16), and a ``segmentation_head`` of one 3x3 conv with bias. The first three blocks upsample 2x;
the last one by patch / 8 (2 for patch-16 backbones, 1.75 for patch-14 ones, 1 for patch 8), so the logits come
out at the input's size. This module computes the same function with the same state-dict keys
(``decoder.conv_more.0.weight``, ``decoder.blocks.3.conv2.1.running_var``, ``segmentation_head.0.bias``, ...),
written from a reading of their source, not copied from it.

Their output channels are the checkpoint's own classes; :class:`PFMSegDecoder` places each on HepatoQuant's
channel for that class (:data:`hepatoquant.segmentation.SEG_CLASS_NAMES`) and gives the classes the checkpoint
lacks a logit no window ever picks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hepatoquant.errors import InvalidParameterError
from hepatoquant.segmentation import SEG_CLASS_NAMES

__all__ = ["DECODER_CHANNELS", "HEAD_CHANNELS", "PFMSegDecoder", "check_source_classes"]

DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 16)
HEAD_CHANNELS = 512
_ABSENT_CLASS_LOGIT = -1.0e4  # representable in fp16 and bf16; loses every argmax and softmaxes to 0


def check_source_classes(source_classes: tuple[str, ...]) -> None:
    """A checkpoint's output channels must each be named with one of HepatoQuant's segmentation classes."""
    unknown = [name for name in source_classes if name not in SEG_CLASS_NAMES]
    if unknown or len(set(source_classes)) != len(source_classes) or "tumour" not in source_classes:
        raise InvalidParameterError(
            f"segmenter classes {list(source_classes)}: name each output channel of the checkpoint, in order, "
            f"with one of {', '.join(SEG_CLASS_NAMES)} (each at most once, tumour included)"
        )


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Their ``Conv2dReLU``: bias-free 3x3 conv (key 0), BatchNorm (key 1), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _UpBlock(nn.Module):
    """Their ``DecoderBlock`` without skips: upsample first, then two conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, scale: float) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.UpsamplingBilinear2d(scale_factor=s) gives floor(size * s) px sampled with align_corners=True; the
        # size is given explicitly so that 1.75 x 128 = 224 is exact whatever the float rounding.
        size = (int(x.shape[-2] * self.scale + 1e-6), int(x.shape[-1] * self.scale + 1e-6))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.conv2(self.conv1(x))


class _DecoderCup(nn.Module):
    def __init__(self, embed_dim: int, patch_size_px: int) -> None:
        super().__init__()
        self.conv_more = _conv_bn_relu(embed_dim, HEAD_CHANNELS)
        inputs = (HEAD_CHANNELS, *DECODER_CHANNELS[:-1])
        scales = (2.0, 2.0, 2.0, patch_size_px / 8)
        self.blocks = nn.ModuleList(_UpBlock(i, o, s) for i, o, s in zip(inputs, DECODER_CHANNELS, scales, strict=True))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.conv_more(grid)
        for block in self.blocks:
            x = block(x)
        return x


class PFMSegDecoder(nn.Module):
    """Patch-token grid (B, D, h, w) → logits (B, 3, h * patch, w * patch) in HepatoQuant's class order.

    ``source_classes`` are the checkpoint's output channels in order, each one of
    :data:`~hepatoquant.segmentation.SEG_CLASS_NAMES` (e.g. ``("background", "tumour", "non_tumour")``).
    """

    def __init__(self, embed_dim: int, patch_size_px: int, source_classes: tuple[str, ...]) -> None:
        super().__init__()
        check_source_classes(source_classes)
        self.decoder = _DecoderCup(embed_dim, patch_size_px)
        self.segmentation_head = nn.Sequential(nn.Conv2d(DECODER_CHANNELS[-1], len(source_classes), 3, padding=1),
                                               nn.Identity())
        self.source_classes = tuple(source_classes)
        # HepatoQuant's channel i is the checkpoint's channel sources[i]; a class it lacks reads the extra channel
        # of _ABSENT_CLASS_LOGIT appended after its own. A gather, not an in-place write, so that the graph OpenVINO
        # converts from it keeps a free batch size.
        sources = [source_classes.index(name) if name in source_classes else len(source_classes)
                   for name in SEG_CLASS_NAMES]
        self.register_buffer("_sources", torch.tensor(sources), persistent=False)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        logits = self.segmentation_head(self.decoder(grid))
        if tuple(logits.shape[-2:]) != tuple(out_size):
            raise InvalidParameterError(
                f"the decoder made {tuple(logits.shape[-2:])} px logits for a {tuple(out_size)} px window"
            )
        if self.source_classes == SEG_CLASS_NAMES:
            return logits
        absent = torch.full_like(logits[:, :1], _ABSENT_CLASS_LOGIT)
        return torch.cat([logits, absent], dim=1).index_select(1, self._sources)
