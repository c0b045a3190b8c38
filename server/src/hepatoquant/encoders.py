"""The encoder registry: each foundation model is one registered function that builds it with timm.

Callers use :func:`create_encoder` and :func:`list_encoders` only, and never branch on a name: everything that
differs between models (input size, normalisation, embedding size and how tokens are pooled into it) is in
the :class:`EncoderConfig` attached to the built :class:`Encoder`. Weights are read from local files only;
the large published models (UNI, UNI2-h, Virchow, Virchow2, Prov-GigaPath, Phikon, Phikon-v2, H-optimus-0 and -1)
are downloads that users provide (most are gated), as local files or through ``models add --from-hub``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hepatoquant.checkpoint_layouts import CHECKPOINT_LAYOUTS, to_timm_names
from hepatoquant.errors import InvalidParameterError, WeightsMismatchError, WeightsNotFoundError


def _timm():
    """timm, imported when an encoder is first built: importing it costs about 3 s here (it loads torchvision and
    torch._dynamo), which a run with a converted classifier (hepatoquant.inference_backend) and no segmenter never
    needs."""
    import timm

    return timm

__all__ = [
    "EncoderConfig",
    "Encoder",
    "create_encoder",
    "encoder_config",
    "list_encoders",
    "load_state_dict_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    """What a caller needs to feed an encoder and use its output.

    Tiles are read at ``spacing_um_px`` and resized to ``input_size_px`` square, scaled to [0, 1] and
    normalised with ``mean``/``std``. ``pooling`` turns the token sequence into the ``embedding_dim``
    embedding: ``"cls"`` (class token), ``"cls+mean_patch"`` (class token concatenated with the mean of the
    patch tokens, register tokens excluded, as Virchow2 prescribes) or ``"attentional"`` (the backbone's own
    learned pooler, its ``pool``: CONCH v1.5).
    """

    name: str
    description: str
    input_size_px: int
    embedding_dim: int
    patch_size_px: int
    pooling: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    spacing_um_px: float = 0.5
    recommended_dtype: str = "bfloat16"
    licence_note: str = ""
    weights_source: str = ""
    dynamic_img_size: bool = False  # built to take other input sizes (whole patches): segmenter windows
    # How the published weights file names its tensors (hepatoquant.checkpoint_layouts): timm's own names, or
    # transformers' ViTModel / Dinov2Model, renamed into timm's on loading.
    checkpoint_layout: str = "timm"


class Encoder(nn.Module):
    """A timm backbone with its config; ``forward`` gives pooled embeddings, ``forward_tokens`` all tokens."""

    def __init__(self, backbone: nn.Module, config: EncoderConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_prefix_tokens: int = int(getattr(backbone, "num_prefix_tokens", 1))

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (batch, prefix + patches, dim) for normalised pixels (batch, 3, H, W)."""
        return self.backbone.forward_features(pixels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "attentional":
            return self.backbone.pool(tokens)
        cls_token = tokens[:, 0]
        if self.config.pooling == "cls":
            return cls_token
        patch_mean = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return torch.cat([cls_token, patch_mean], dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_tokens(pixels))


_Builder = Callable[[], nn.Module]
POOLINGS = ("cls", "cls+mean_patch", "attentional")
_REGISTRY: dict[str, tuple[EncoderConfig, _Builder]] = {}


def _register(config: EncoderConfig) -> Callable[[_Builder], _Builder]:
    def decorator(build: _Builder) -> _Builder:
        if config.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {config.pooling!r} for encoder {config.name!r}")
        if config.checkpoint_layout not in CHECKPOINT_LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {config.checkpoint_layout!r} for encoder {config.name!r}")
        _REGISTRY[config.name] = (config, build)
        return build

    return decorator


# --- published pathology foundation models -------------------------------------------------------------


@_register(
    EncoderConfig(
        name="uni",
        description="UNI v1 (Mahmood Lab), ViT-L/16, DINOv2 on 100M H&E tiles",
        input_size_px=224,
        embedding_dim=1024,
        patch_size_px=16,
        pooling="cls",
        licence_note="CC BY-NC-ND 4.0, research use only; weights from the gated MahmoodLab/UNI repository",
        weights_source="hf_hub: MahmoodLab/UNI (pytorch_model.bin)",
        dynamic_img_size=True,
    )
)
def uni() -> nn.Module:
    # timm arguments from the UNI model card.
    return _timm().create_model(
        "vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16, init_values=1e-5,
        num_classes=0, dynamic_img_size=True,
    )


@_register(
    EncoderConfig(
        name="virchow2",
        description="Virchow2 (Paige), ViT-H/14 with SwiGLU and 4 register tokens",
        input_size_px=224,
        embedding_dim=2560,
        patch_size_px=14,
        pooling="cls+mean_patch",
        recommended_dtype="float16",
        licence_note="CC BY-NC-ND 4.0, research use only; weights from the gated paige-ai/Virchow2 repository",
        weights_source="hf_hub: paige-ai/Virchow2 (pytorch_model.bin)",
        dynamic_img_size=True,
    )
)
def virchow2() -> nn.Module:
    # timm arguments from the Virchow2 model card (config.json model_args plus the SwiGLU / SiLU layers).
    return _timm().create_model(
        "vit_huge_patch14_224", pretrained=False, img_size=224, init_values=1e-5, num_classes=0,
        mlp_ratio=5.3375, reg_tokens=4, global_pool="", dynamic_img_size=True,
        mlp_layer=_timm().layers.SwiGLUPacked, act_layer=nn.SiLU,
    )


@_register(
    EncoderConfig(
        name="gigapath",
        description="Prov-GigaPath tile encoder (Providence / Microsoft), ViT-g/16, DINOv2",
        input_size_px=224,
        embedding_dim=1536,
        patch_size_px=16,
        pooling="cls",
        licence_note="Prov-GigaPath licence (research use only); weights from the gated prov-gigapath repository",
        weights_source="hf_hub: prov-gigapath/prov-gigapath (pytorch_model.bin)",
        dynamic_img_size=True,
    )
)
def gigapath() -> nn.Module:
    # timm arguments from the Prov-GigaPath config.json (architecture vit_giant_patch14_dinov2); dynamic_img_size
    # as PFM_Segmentation builds it, so its segmenters can use larger windows (224 px inputs are unchanged).
    return _timm().create_model(
        "vit_giant_patch14_dinov2", pretrained=False, img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
        depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True,
    )


# The rest of PFM_Segmentation's backbones that timm builds (its names: uni_v2, virchow_v1, phikon, phikon_v2,
# hoptimus_0, hoptimus_1, conch_v1_5, lunit_vits8). Arguments as the owners' cards and TRIDENT's loaders (mahmoodlab/TRIDENT,
# trident/patch_encoder_models/load.py) give them; tests/published_checkpoints.py records each fact's source.


@_register(
    EncoderConfig(
        name="uni2_h",
        description="UNI2-h (Mahmood Lab), ViT-H/14 with SwiGLU and 8 register tokens, DINOv2 on 200M+ tiles",
        input_size_px=224,
        embedding_dim=1536,
        patch_size_px=14,
        pooling="cls",
        licence_note="CC BY-NC-ND 4.0, research use only; weights from the gated MahmoodLab/UNI2-h repository",
        weights_source="hf_hub: MahmoodLab/UNI2-h (pytorch_model.bin)",
        dynamic_img_size=True,
    )
)
def uni2_h() -> nn.Module:
    # timm arguments of the UNI2-h model card (as TRIDENT and PFM_Segmentation build it).
    return _timm().create_model(
        "vit_giant_patch14_224", pretrained=False, img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
        mlp_layer=_timm().layers.SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True,
    )


@_register(
    EncoderConfig(
        name="virchow",
        description="Virchow (Paige), ViT-H/14 with SwiGLU, no register tokens",
        input_size_px=224,
        embedding_dim=2560,
        patch_size_px=14,
        pooling="cls+mean_patch",
        recommended_dtype="float16",
        licence_note="CC BY-NC-ND 4.0, research use only; weights from the gated paige-ai/Virchow repository",
        weights_source="hf_hub: paige-ai/Virchow (pytorch_model.bin)",
        dynamic_img_size=True,
    )
)
def virchow() -> nn.Module:
    # TRIDENT's arguments for Virchow (v1): Virchow2's without the register tokens.
    return _timm().create_model(
        "vit_huge_patch14_224", pretrained=False, img_size=224, init_values=1e-5, num_classes=0,
        mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
        mlp_layer=_timm().layers.SwiGLUPacked, act_layer=nn.SiLU,
    )


@_register(
    EncoderConfig(
        name="phikon",
        description="Phikon (Owkin), ViT-B/16, iBOT on 40M TCGA tiles",
        input_size_px=224,
        embedding_dim=768,
        patch_size_px=16,
        pooling="cls",
        recommended_dtype="float32",
        licence_note="Owkin non-commercial licence (see its model card); weights from owkin/phikon",
        weights_source="hf_hub: owkin/phikon (model.safetensors)",
        dynamic_img_size=True,
        checkpoint_layout="transformers_vit",
    )
)
def phikon() -> nn.Module:
    # The ViTModel of its config.json (768-d, 12 layers, 12 heads, MLP 3072, qkv bias) in timm's modules; the
    # embedding is the class token of the last hidden state, after the final LayerNorm (TRIDENT). LayerNorm eps:
    # timm's 1e-6, which the repository's config was changed to ("to match timm": it was trained with timm).
    return _timm().create_model("vit_base_patch16_224", pretrained=False, img_size=224, num_classes=0,
                             dynamic_img_size=True)


@_register(
    EncoderConfig(
        name="phikon_v2",
        description="Phikon-v2 (Owkin), ViT-L/16, DINOv2 on 450M tiles of PANCAN-XL",
        input_size_px=224,
        embedding_dim=1024,
        patch_size_px=16,
        pooling="cls",
        recommended_dtype="float32",
        licence_note="Owkin non-commercial licence (LICENSE.pdf in its repository); weights from owkin/phikon-v2",
        weights_source="hf_hub: owkin/phikon-v2 (model.safetensors)",
        dynamic_img_size=True,
        checkpoint_layout="transformers_dinov2",
    )
)
def phikon_v2() -> nn.Module:
    # transformers' Dinov2Model at ViT-L/16 (LayerScale, GELU MLP of ratio 4, LayerNorm eps 1e-6) in timm's
    # modules; DINOv2's training mask token is not part of the model.
    return _timm().create_model("vit_large_patch16_224", pretrained=False, img_size=224, init_values=1.0,
                             num_classes=0, dynamic_img_size=True)


@_register(
    EncoderConfig(
        name="conch_v15",
        description="CONCH v1.5 (Mahmood Lab) vision tower, ViT-L/16 at 448 px with an attentional pooler (CoCa)",
        input_size_px=448,
        embedding_dim=768,
        patch_size_px=16,
        pooling="attentional",
        recommended_dtype="float16",
        licence_note="CC BY-NC-ND 4.0, research use only; weights from the gated MahmoodLab/conchv1_5 repository",
        weights_source="hf_hub: MahmoodLab/conchv1_5 (pytorch_model_vision.bin)",
        dynamic_img_size=True,
    )
)
def conch_v15() -> nn.Module:
    from hepatoquant.attentional_pooling import ConchV15Vision

    return ConchV15Vision()


@_register(
    EncoderConfig(
        name="lunit_vits8",
        description="Lunit DINO ViT-S/8 (Lunit), 19M tiles of 36k slides",
        input_size_px=224,
        embedding_dim=384,
        patch_size_px=8,
        pooling="cls",
        mean=(0.70322989, 0.53606487, 0.66096631),  # Lunit's training statistics
        std=(0.21716536, 0.26081574, 0.20723464),
        recommended_dtype="float32",
        licence_note="Lunit's non-commercial licence; timm weights re-hosted as 1aurent/vit_small_patch8_224.lunit_dino",
        weights_source="hf_hub: 1aurent/vit_small_patch8_224.lunit_dino (model.safetensors)",
        dynamic_img_size=True,
    )
)
def lunit_vits8() -> nn.Module:
    # PFM_Segmentation's lunit_vits8: timm vit_small_patch8_224 at 224 px, the class token.
    return _timm().create_model("vit_small_patch8_224", pretrained=False, img_size=224, num_classes=0,
                             dynamic_img_size=True)


HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # the H-optimus cards and config.json
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _hoptimus() -> nn.Module:
    # config.json: vit_giant_patch14_reg4_dinov2, global_pool token; card: init_values 1e-5. dynamic_img_size as
    # TRIDENT and PFM_Segmentation build it (224 px inputs are unchanged).
    return _timm().create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=224, init_values=1e-5,
                             num_classes=0, global_pool="token", dynamic_img_size=True)


for _name, _repo, _text, _licence in (
    ("hoptimus0", "bioptimus/H-optimus-0", "H-optimus-0 (Bioptimus), ViT-g/14 with 4 register tokens, 500k+ slides",
     "Apache 2.0 (config.json); weights from bioptimus/H-optimus-0"),
    ("hoptimus1", "bioptimus/H-optimus-1", "H-optimus-1 (Bioptimus), ViT-g/14 with 4 register tokens, 1M+ slides",
     "non-commercial terms of the gated bioptimus/H-optimus-1 repository (see its model card)"),
):
    _register(
        EncoderConfig(
            name=_name, description=_text, input_size_px=224, embedding_dim=1536, patch_size_px=14, pooling="cls",
            mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, recommended_dtype="float16", licence_note=_licence,
            weights_source=f"hf_hub: {_repo} (pytorch_model.bin)", dynamic_img_size=True,
        )
    )(_hoptimus)


# --- small architectures for the demo and the tests ----------------------------------------------------


@_register(
    EncoderConfig(
        name="demo_vit_tiny",
        description="ViT-Ti/16 (5.5M parameters), random weights: the demo pack's encoder, fast on a CPU",
        input_size_px=224,
        embedding_dim=192,
        patch_size_px=16,
        pooling="cls",
        recommended_dtype="float32",
        licence_note="HepatoQuant demo weights, fixed seed, untrained: not for any measurement",
    )
)
def demo_vit_tiny() -> nn.Module:
    return _timm().create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)


@_register(
    EncoderConfig(
        name="bench_vit_small",
        description="ViT-S/16 (22M parameters), random weights: a small pathology encoder's size, for speed benchmarks",
        input_size_px=224,
        embedding_dim=384,
        patch_size_px=16,
        pooling="cls",
        recommended_dtype="float32",
        licence_note="random weights: for measuring speed only",
    )
)
def bench_vit_small() -> nn.Module:
    return _timm().create_model("vit_small_patch16_224", pretrained=False, num_classes=0)


@_register(
    EncoderConfig(
        name="test_vit_micro",
        description="2-block ViT, 32-d, 32 px input: for tests",
        input_size_px=32,
        embedding_dim=32,
        patch_size_px=8,
        pooling="cls",
        recommended_dtype="float32",
        licence_note="test architecture, random weights",
    )
)
def test_vit_micro() -> nn.Module:
    return _timm().create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, init_values=1e-5, num_classes=0,
    )


@_register(
    EncoderConfig(
        name="test_vit_micro_reg",
        description="2-block ViT with SwiGLU and 2 register tokens, Virchow2-style pooling: for tests",
        input_size_px=28,
        embedding_dim=64,
        patch_size_px=7,
        pooling="cls+mean_patch",
        recommended_dtype="float32",
        licence_note="test architecture, random weights",
    )
)
def test_vit_micro_reg() -> nn.Module:
    return _timm().create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32, depth=2,
        num_heads=2, init_values=1e-5, num_classes=0, reg_tokens=2, global_pool="", mlp_ratio=2.0,
        mlp_layer=_timm().layers.SwiGLUPacked, act_layer=nn.SiLU,
    )


# --- public API ----------------------------------------------------------------------------------------


def list_encoders() -> list[str]:
    """Names of all registered encoders."""
    return sorted(_REGISTRY)


def encoder_config(name: str) -> EncoderConfig:
    """The config of a registered encoder, without building it."""
    try:
        return _REGISTRY[name][0]
    except KeyError:
        raise InvalidParameterError(
            f"unknown encoder {name!r}; registered encoders: {', '.join(list_encoders())}"
        ) from None


def create_encoder(
    name: str, *, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> Encoder:
    """Build encoder ``name``; with ``weights`` (safetensors or a PyTorch checkpoint) load them strictly.

    With weights, the model is built on the meta device and the tensors are assigned from the file, so a
    1B-parameter model is never randomly initialised first. ``device="meta"`` builds it without memory (for
    checking architectures).
    """
    config = encoder_config(name)
    build = _REGISTRY[name][1]
    device = torch.device(device)
    if weights is None:
        with _default_device(device):
            return Encoder(build(), config).eval()
    with _default_device(torch.device("meta")):
        encoder = Encoder(build(), config)
    state_dict = to_timm_names(load_state_dict_file(weights), config.checkpoint_layout)
    _load_strict(encoder.backbone, state_dict, source=Path(weights), encoder_name=name)
    return encoder.to(device).eval()


@contextlib.contextmanager
def _default_device(device: torch.device) -> Iterator[None]:
    if device.type == "cpu":
        yield
        return
    with device:
        yield


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a PyTorch checkpoint (plain, or under a ``state_dict``/``model`` key)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist; give the path of a downloaded checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise WeightsMismatchError(
                f"weights file {str(path)!r} is not a readable safetensors file ({exc}); give an intact checkpoint"
            ) from exc
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise WeightsMismatchError(
            f"weights file {str(path)!r} is not a readable PyTorch checkpoint or safetensors file ({exc})"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsMismatchError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return checkpoint


def _load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: Path, encoder_name: str) -> None:
    """Load with exact names and shapes, or raise an error listing what differs."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} with other shapes (e.g. {k}: file {given[k]}, model {expected[k]})")
        raise WeightsMismatchError(
            f"weights file {str(source)!r} does not fit encoder {encoder_name!r}: "
            + "; ".join(details)
            + f". Check that it is the checkpoint of {encoder_config(encoder_name).description}, or choose the "
            "encoder it belongs to"
        )
    module.load_state_dict(state_dict, strict=True, assign=True)
