"""The region segmenter: a registry encoder adapted with LoRA (peft) and a light progressive-upsampling decoder.

Patch tokens of the ViT are laid back on their grid and upsampled by 2x convolution stages to the input
resolution (UNETR / PFM_Segmentation style, without skip connections: the tokens already carry the context).
Only the LoRA matrices (attention ``qkv`` and ``proj``) and the decoder train; the backbone stays frozen.
Two decoders share that interface: HepatoQuant's own :class:`TokenDecoder`, and PFM_Segmentation's
(:class:`hepatoquant.segmentation.pfmseg.PFMSegDecoder`) for the segmenters trained with that code; a segmenter
may also have no LoRA at all (their frozen-backbone mode).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hepatoquant.encoders import Encoder, create_encoder
from hepatoquant.errors import InvalidParameterError
from hepatoquant.segmentation import SEG_CLASS_NAMES

__all__ = ["LoRASettings", "TokenDecoder", "SegmentationModel", "build_segmentation_model", "parameter_counts"]

# Attention input and output projections of every transformer block (not the patch embedding's ``proj``).
LORA_TARGET_MODULES = r".*\.attn\.(qkv|proj)"


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise InvalidParameterError(
                f"LoRA settings {asdict(self)} are invalid: rank >= 1, alpha > 0 and 0 <= dropout < 1"
            )

    def peft_config(self):  # -> peft.LoraConfig (peft is imported lazily: it takes seconds)
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=LORA_TARGET_MODULES
        )


class TokenDecoder(nn.Module):
    """Patch-token grid (B, D, h, w) → per-pixel logits (B, classes, h * patch, w * patch)."""

    def __init__(self, embed_dim: int, patch_size_px: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        stages = max(1, math.ceil(math.log2(patch_size_px)))
        channels = [max(width >> i, 16) for i in range(stages + 1)]
        self.input = nn.Sequential(nn.Conv2d(embed_dim, channels[0], 1), nn.GroupNorm(8, channels[0]), nn.GELU())
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(channels[i], channels[i + 1], 3, padding=1),
                nn.GroupNorm(8, channels[i + 1]),
                nn.GELU(),
            )
            for i in range(stages)
        )
        self.head = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        x = self.input(grid)
        for stage in self.up:
            x = stage(x)
        x = self.head(x)
        if tuple(x.shape[-2:]) != out_size:  # patch sizes that are not powers of two (14)
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return x


class SegmentationModel(nn.Module):
    """Encoder (LoRA-wrapped backbone) + decoder; takes normalised pixels, returns per-pixel logits."""

    def __init__(
        self, encoder: Encoder, decoder: nn.Module, peft_model, base_state_dict: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder  # (grid (B, D, h, w), out_size) -> logits (B, len(SEG_CLASS_NAMES), *out_size)
        self.classes = SEG_CLASS_NAMES
        self.input_size_px = encoder.config.input_size_px  # the window side; a pack may set another one
        # Kept outside the module tree (plain attributes): the peft wrapper shares the backbone's parameters
        # and only serves to save the adapter in peft's own format; the base tensors are the frozen backbone
        # weights under their original names, for the pack's encoder file.
        self.__dict__["peft_model"] = peft_model
        self.__dict__["base_state_dict"] = base_state_dict

    def save_adapter(self, directory: Path) -> None:
        """peft's own adapter format: adapter_config.json + adapter_model.safetensors."""
        if self.peft_model is None:
            raise ValueError("this segmenter has no LoRA adapter (frozen backbone)")
        self.peft_model.save_pretrained(str(directory))

    @property
    def patch_size_px(self) -> int:
        return self.encoder.config.patch_size_px

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        patch = self.patch_size_px
        if height % patch or width % patch:
            raise InvalidParameterError(
                f"input {width} x {height} px is not a multiple of the encoder's patch size {patch} px; "
                f"use a window size that is a multiple of {patch}"
            )
        tokens = self.encoder.forward_tokens(pixels)[:, self.encoder.num_prefix_tokens :]
        # contiguous, as PFM_Segmentation lays its grid out: the decoder's convolutions then add up in the same
        # order and an imported checkpoint gives their logits bit for bit (a strided view differed by ~5e-5)
        grid = tokens.transpose(1, 2).contiguous().view(tokens.shape[0], tokens.shape[2], height // patch, width // patch)
        return self.decoder(grid, (height, width))


def build_segmentation_model(
    encoder_name: str,
    *,
    encoder_weights: str | Path | None = None,
    lora: LoRASettings | None = LoRASettings(),
    adapter_dir: str | Path | None = None,
    decoder_width: int = 64,
    pfmseg_classes: tuple[str, ...] | None = None,
) -> SegmentationModel:
    """Registry encoder (frozen) + fresh LoRA (or the peft adapter saved in ``adapter_dir``; none when ``lora`` is
    None) + decoder: :class:`TokenDecoder`, or PFM_Segmentation's when ``pfmseg_classes`` names its channels.

    The decoder's weights are loaded separately by the model pack; here it is freshly initialised.
    """
    encoder = create_encoder(encoder_name, weights=encoder_weights)
    encoder.backbone.requires_grad_(False)
    base_state_dict = dict(encoder.backbone.state_dict())  # same tensors; LoRA wraps, never replaces, them
    peft_model = None
    if lora is not None:
        from peft import PeftModel, get_peft_model

        if adapter_dir is None:
            peft_model = get_peft_model(encoder.backbone, lora.peft_config())  # injects LoRA layers in place
        else:
            peft_model = PeftModel.from_pretrained(encoder.backbone, str(adapter_dir), is_trainable=True)
    config = encoder.config
    if pfmseg_classes is not None:
        from hepatoquant.segmentation.pfmseg import PFMSegDecoder

        decoder: nn.Module = PFMSegDecoder(encoder.backbone.embed_dim, config.patch_size_px, pfmseg_classes)
    else:
        decoder = TokenDecoder(encoder.backbone.embed_dim, config.patch_size_px, len(SEG_CLASS_NAMES), decoder_width)
    return SegmentationModel(encoder, decoder, peft_model, base_state_dict)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
