"""PFM_Segmentation checkpoints and released linear heads, imported as packs (`hepatoquant models import-pfmseg`,
`import-head`).

The reference below is PFM_Segmentation's model as their source describes it (LoRALinear with ``lora_a`` [in, r],
``lora_b`` [r, out] and ``scale``; Conv2dReLU, DecoderBlock with ``nn.UpsamplingBilinear2d``, DecoderCup with a
square token grid, SegmentationHead; tokens after the final norm, class and register tokens sliced off): written
from their description so that a checkpoint in their exact key layout can be made here with random weights and the
imported pack compared output for output with it. Their ``models/lora.py`` (commits ca80211 and f83b1e9) sets
``self.scale = lora_alpha``: the checkpoints made here use that unless a test says otherwise, and are imported with
the default scaling.

``HEPATOQUANT_HEAVY_TESTS=1`` also runs the comparison on UNI's architecture (ViT-L/16, random weights; 3.5 GB of
memory, 2.5 GB of disk, about a minute on two CPU cores).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hepatoquant.cli import EXIT_USER_ERROR, main
from hepatoquant.errors import HepatoQuantError, InvalidParameterError, ModelPackError, WeightsMismatchError
from hepatoquant.segmentation import SEG_CLASS_NAMES
from hepatoquant.segmentation.pack import load_segmenter
from hepatoquant.segmentation.pfmseg import PFMSegDecoder
from hepatoquant.segmentation.pfmseg_import import import_pfmseg

CPU = torch.device("cpu")
# PFM_Segmentation slices class (+ register) tokens off with hard-coded counts per model.
PREFIX_TOKENS = {"test_vit_micro": 1, "test_vit_micro_reg": 3, "demo_vit_tiny": 1, "uni": 1}
HEAVY = os.environ.get("HEPATOQUANT_HEAVY_TESTS") == "1"


# --- their model, as the reference -----------------------------------------------------------------------------
class RefLoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, scale: float, std: float = 0.2) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.lora_a = nn.Parameter(torch.randn(linear.in_features, rank) * std)
        self.lora_b = nn.Parameter(torch.randn(rank, linear.out_features) * std)
        self.scale = scale  # their models/lora.py: lora_alpha (commits ca80211, f83b1e9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + ((x @ self.lora_a) @ self.lora_b) * self.scale


class RefConv2dReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RefDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: float = 2) -> None:
        super().__init__()
        self.conv1, self.conv2 = RefConv2dReLU(cin, cout), RefConv2dReLU(cout, cout)
        self.up = nn.UpsamplingBilinear2d(scale_factor=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(self.up(x)))


class RefDecoderCup(nn.Module):
    def __init__(self, emb_dim: int, last_scale: float) -> None:
        super().__init__()
        self.conv_more = RefConv2dReLU(emb_dim, 512)
        ins, outs = [512, 256, 128, 64], (256, 128, 64, 16)
        blocks = [RefDecoderBlock(i, o) for i, o in zip(ins, outs, strict=True)]
        blocks[-1] = RefDecoderBlock(ins[-1], outs[-1], scale=last_scale)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n_patch, dim = hidden.size()
        h = w = int(np.sqrt(n_patch))
        x = self.conv_more(hidden.permute(0, 2, 1).contiguous().view(b, dim, h, w))
        for block in self.blocks:
            x = block(x)
        return x


class RefPFMSeg(nn.Module):
    def __init__(self, backbone: nn.Module, prefix: int, num_classes: int, patch: int,
                 lora: tuple[int, float, float] | None):
        super().__init__()
        self.decoder = RefDecoderCup(backbone.embed_dim, patch / 8)
        self.segmentation_head = nn.Sequential(nn.Conv2d(16, num_classes, 3, padding=1), nn.Identity())
        self.pfm, self.prefix = backbone, prefix
        if lora is not None:
            for block in backbone.blocks:
                block.attn.qkv = RefLoRALinear(block.attn.qkv, *lora)
                block.attn.proj = RefLoRALinear(block.attn.proj, *lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.pfm.forward_features(x)[:, self.prefix:]))


def _train_like_batchnorm(model: nn.Module, inputs: torch.Tensor) -> None:
    """Trained-looking BatchNorm: running statistics of the activations ``model`` computes from ``inputs`` (as
    training leaves them: every layer passes a signal of unit scale on, so the logits depend on the tokens) and
    affine parameters far from 1 / 0, so that carrying all of them matters. ``model`` is left in eval mode."""
    generator = torch.Generator().manual_seed(5)
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for module in norms:
        n = module.num_features
        module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
        module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: the statistics of this one batch
        module.train()
    with torch.no_grad():
        model(inputs)
    for module in norms:
        module.momentum = 0.1
        module.num_batches_tracked.fill_(123)
    model.eval()


def make_pfmseg_checkpoint(folder: Path, build_tiny_encoder, *, backbone: str = "test_vit_micro", mode: str = "lora",
                           rank: int = 4, alpha: float = 2.0, scaling: str = "alpha", lora_std: float = 0.05,
                           num_classes: int = 3, pfm_name: str | None = None, whole_model: bool = False,
                           config_scaling: str | None = None, legacy_format: bool = False) -> dict:
    """A checkpoint in PFM_Segmentation's layout, the backbone weights file, and the reference model (eval).

    ``scaling``: how the reference scales its LoRA path (``alpha``: their ``self.scale = lora_alpha``); the file
    does not say so unless ``config_scaling`` puts it in the config (``model.finetune_mode.lora_scaling``)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = build_tiny_encoder(backbone, seed=1, layer_scale=1.0) if backbone != "demo_vit_tiny" else None
    if encoder is None:
        from hepatoquant.encoders import create_encoder

        torch.manual_seed(1)
        encoder = create_encoder(backbone)
    weights = folder / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(weights))
    scale = alpha if scaling == "alpha" else alpha / rank
    torch.manual_seed(2)
    reference = RefPFMSeg(encoder.backbone, PREFIX_TOKENS[backbone], num_classes, encoder.config.patch_size_px,
                          (rank, scale, lora_std) if mode == "lora" else None)
    reference.eval()
    size = encoder.config.input_size_px
    _train_like_batchnorm(reference, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(6)))
    state = reference.state_dict()
    if mode == "lora" and not whole_model:
        state = {k: v for k, v in state.items() if "lora_" in k or k.startswith(("decoder.", "segmentation_head."))}
    elif mode == "frozen" and not whole_model:
        state = {k: v for k, v in state.items() if k.startswith(("decoder.", "segmentation_head."))}
    checkpoint = {
        "epoch": 7,
        "model_state_dict": state,
        "optimizer_state_dict": {},
        "metrics": {"mIoU": np.float64(0.61), "pixel_acc": np.float32(0.9)},
        "config": {"model": {"pfm_name": backbone if pfm_name is None else pfm_name, "emb_dim": encoder.backbone.embed_dim,
                             "finetune_mode": {"type": mode, "rank": rank, "alpha": alpha},
                             "num_classes": num_classes}},
        "finetune_mode": mode,
    }
    if config_scaling is not None:
        checkpoint["config"]["model"]["finetune_mode"]["lora_scaling"] = config_scaling
    path = folder / ("best_lora_and_decoder_head.pth" if mode == "lora" else "best_decoder_head.pth")
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    return {"checkpoint": path, "weights": weights, "reference": reference, "encoder": encoder, "scale": scale,
            "alpha": alpha, "rank": rank}


@pytest.fixture
def pfm_checkpoint(tmp_path: Path, build_tiny_encoder):
    def make(**kwargs) -> dict:
        return make_pfmseg_checkpoint(tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}", build_tiny_encoder, **kwargs)

    return make


def _import(made: dict, tmp_path: Path, backbone: str = "test_vit_micro",
            classes: tuple[str, ...] = ("background", "non_tumour", "tumour"), **kwargs):
    """Imported as a user would: the LoRA scaling is the default unless ``lora_scaling`` is passed."""
    options = {"name": "pfm", "spacing_um_px": 2.0, "models_dir": tmp_path / "models", **kwargs}
    return import_pfmseg(made["checkpoint"], backbone=backbone, backbone_weights=made["weights"], classes=classes,
                         **options)


def _compare(made: dict, pack, classes: tuple[str, ...], size: int, batch: int = 2) -> float:
    ours = load_segmenter(pack, CPU)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = made["reference"](pixels)
        got = ours(pixels)
    assert got.shape == (batch, len(SEG_CLASS_NAMES), size, size) and expected.shape[-2:] == (size, size)
    for channel, name in enumerate(classes):
        torch.testing.assert_close(got[:, SEG_CLASS_NAMES.index(name)], expected[:, channel], rtol=1e-4, atol=1e-4)
    return float(expected.abs().max())


# --- the LoRA layer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["alpha", "alpha/r"])
def test_a_converted_lora_layer_computes_their_formula(pfm_checkpoint, tmp_path: Path, scaling: str) -> None:
    made = pfm_checkpoint(rank=4, alpha=6.0, scaling=scaling)
    pack = _import(made, tmp_path, lora_scaling=scaling)
    layer = load_segmenter(pack, CPU).encoder.backbone.blocks[1].attn.proj
    theirs = made["reference"].pfm.blocks[1].attn.proj
    x = torch.randn(5, 7, theirs.weight.shape[1], generator=torch.Generator().manual_seed(3))
    scale = 6.0 if scaling == "alpha" else 6.0 / 4
    formula = F.linear(x, theirs.weight, theirs.bias) + ((x @ theirs.lora_a) @ theirs.lora_b) * scale
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), formula, rtol=1e-5, atol=1e-6)
        assert (layer(x) - F.linear(x, theirs.weight, theirs.bias)).abs().max() > 1e-2  # the LoRA path matters
    assert layer.scaling["default"] == pytest.approx(scale)
    manifest = pack.manifest
    assert manifest["lora"] == {"rank": 4, "alpha": pytest.approx(scale * 4), "dropout": 0.0}
    assert manifest["training"]["imported_from"]["lora_scale"] == pytest.approx(scale)


# --- the LoRA scale: their code's by default ---------------------------------------------------------------------
def _check_against_theirs(made: dict, pack, size: int, batch: int = 2) -> dict[str, float]:
    """The pack's logits against their forward pass (``made["reference"]``, classes in HepatoQuant's order) on
    ``batch`` random ``size`` px images: within 1e-4 everywhere, on weights whose logits vary across pixels and
    images and depend on the LoRA (zeroing every lora_b, or the other scaling: alpha / r instead of alpha or the
    reverse, moves them by over 1000 times the tolerance). Returns the measurements."""
    reference, ours = made["reference"], load_segmenter(pack, CPU)
    loras = [module for module in reference.modules() if isinstance(module, RefLoRALinear)]
    assert loras and all(layer.scale == made["scale"] for layer in loras)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected, got = reference(pixels), ours(pixels)
        saved = [layer.lora_b.detach().clone() for layer in loras]
        for layer in loras:
            layer.lora_b.zero_()
        without_lora = reference(pixels)
        for layer, lora_b in zip(loras, saved, strict=True):
            layer.lora_b.copy_(lora_b)
            layer.scale = made["alpha"] if made["scale"] != made["alpha"] else made["alpha"] / made["rank"]
        other_scaling = reference(pixels)
        for layer in loras:
            layer.scale = made["scale"]
    assert got.shape == expected.shape == (batch, len(SEG_CLASS_NAMES), size, size)
    stats = {
        "max_abs_diff": float((got - expected).abs().max()),
        "max_abs_logit": float(expected.abs().max()),
        "min_pixel_std": float(expected.flatten(2).std(dim=2).min()),  # per image and class, across pixels
        "images_mean_abs_diff": float((expected[0] - expected[-1]).abs().mean()) if batch > 1 else float("nan"),
        "lora_b_zeroed_max_abs_diff": float((without_lora - expected).abs().max()),
        "other_scaling_max_abs_diff": float((other_scaling - expected).abs().max()),
    }
    assert stats["max_abs_diff"] < 1e-4, stats
    assert stats["min_pixel_std"] > 0.1, stats  # the logits are not a constant the decoder's biases make
    assert batch == 1 or stats["images_mean_abs_diff"] > 0.1, stats  # ... and depend on the input
    assert stats["lora_b_zeroed_max_abs_diff"] > 0.1, stats  # the LoRA matters
    assert stats["other_scaling_max_abs_diff"] > 0.1, stats  # a wrong scaling would be caught
    return stats


@pytest.mark.parametrize("backbone, size", [("demo_vit_tiny", 224), ("test_vit_micro", 32)])
def test_by_default_the_lora_is_scaled_as_their_code_scales_it(pfm_checkpoint, tmp_path: Path, backbone: str,
                                                                size: int, record_property) -> None:
    """Their models/lora.py (commits ca80211, f83b1e9): self.scale = lora_alpha. Imported without saying how it was
    scaled, the pack computes their forward pass (alpha 8, rank 4: scale 8, where alpha / r would give 2)."""
    made = pfm_checkpoint(backbone=backbone, alpha=8.0, rank=4, lora_std=0.04)
    pack = _import(made, tmp_path, backbone=backbone)
    source = pack.manifest["training"]["imported_from"]
    assert source["lora_scale"] == pytest.approx(8.0) and source["lora_scaling"] == "alpha"
    assert source["lora_scaling_from"].startswith("default")
    assert pack.manifest["lora"] == {"rank": 4, "alpha": pytest.approx(32.0), "dropout": 0.0}  # peft's alpha: 8 * r
    for name, value in _check_against_theirs(made, pack, size).items():
        record_property(name, value)


def test_a_scaling_named_in_the_checkpoint_is_followed_and_an_argument_wins(pfm_checkpoint, tmp_path: Path) -> None:
    """A fork whose config says how its LoRA is scaled (model.finetune_mode.lora_scaling) is imported as it says;
    an explicit lora_scaling overrides the file; a value that is not a scaling is refused, naming the key."""
    made = pfm_checkpoint(alpha=8.0, rank=4, lora_std=0.06, scaling="alpha/r", config_scaling="alpha / r")
    pack = _import(made, tmp_path)
    source = pack.manifest["training"]["imported_from"]
    assert (source["lora_scaling"], source["lora_scale"]) == ("alpha/r", pytest.approx(2.0))
    assert source["lora_scaling_from"] == "checkpoint config model.finetune_mode.lora_scaling"
    _check_against_theirs(made, pack, 32)
    source = _import(made, tmp_path, name="pfm2", lora_scaling="alpha").manifest["training"]["imported_from"]
    assert (source["lora_scaling"], source["lora_scale"], source["lora_scaling_from"]) == ("alpha", 8.0, "argument")
    odd = pfm_checkpoint(config_scaling="sqrt")
    with pytest.raises(WeightsMismatchError, match=r"model\.finetune_mode\.lora_scaling is 'sqrt'.*--lora-scaling"):
        _import(odd, tmp_path, name="pfm3")
    assert _import(odd, tmp_path, name="pfm4", lora_scaling="alpha").manifest["lora"]["rank"] == 4


# --- whole models, output for output ----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, size", [("test_vit_micro", 32), ("test_vit_micro_reg", 28), ("demo_vit_tiny", 224)])
def test_an_imported_lora_segmenter_computes_what_their_model_computes(pfm_checkpoint, tmp_path: Path,
                                                                       backbone: str, size: int) -> None:
    classes = ("background", "tumour", "non_tumour")  # their channel order need not be ours
    made = pfm_checkpoint(backbone=backbone)
    pack = _import(made, tmp_path, backbone=backbone, classes=classes)
    assert _compare(made, pack, classes, size) > 0.1
    assert pack.kind == "segmenter" and pack.manifest["decoder"]["kind"] == "pfmseg"
    assert pack.manifest["decoder"]["source_classes"] == list(classes)


def test_frozen_checkpoints_and_two_class_models(pfm_checkpoint, tmp_path: Path) -> None:
    classes = ("non_tumour", "tumour")  # no background channel: tissue is tumour or not
    made = pfm_checkpoint(mode="frozen", num_classes=2)
    pack = _import(made, tmp_path, classes=classes, lora_scaling=None)
    assert "lora" not in pack.manifest and "adapter" not in pack.manifest
    _compare(made, pack, classes, 32)
    with torch.inference_mode():
        logits = load_segmenter(pack, CPU)(torch.randn(1, 3, 32, 32))
    assert (logits.argmax(dim=1) != SEG_CLASS_NAMES.index("background")).all()  # the absent class never wins


def test_their_first_trainers_whole_model_files_are_checked_against_the_backbone(pfm_checkpoint, tmp_path: Path) -> None:
    made = pfm_checkpoint(whole_model=True)
    _compare(made, _import(made, tmp_path), SEG_CLASS_NAMES, 32)
    checkpoint = torch.load(made["checkpoint"], weights_only=False)
    checkpoint["model_state_dict"]["pfm.blocks.0.mlp.fc1.weight"] += 0.01
    torch.save(checkpoint, made["checkpoint"])
    with pytest.raises(WeightsMismatchError, match=r"pfm\.blocks\.0\.mlp\.fc1\.weight differs"):
        _import(made, tmp_path, name="pfm2")


def test_the_patch_14_decoder_upsamples_like_theirs() -> None:
    """Virchow2-style patch 14: 16 x 16 tokens → 224 px through 2, 2, 2 and 1.75 (their scale for patch-14 models)."""
    torch.manual_seed(0)
    reference = RefDecoderCup(24, 1.75)
    _train_like_batchnorm(reference, torch.randn(4, 256, 24))
    ours = PFMSegDecoder(24, 14, SEG_CLASS_NAMES)
    ours.decoder.load_state_dict(reference.state_dict())
    ours.eval()
    tokens = torch.randn(2, 256, 24)
    with torch.inference_mode():
        expected = reference(tokens)
        got = ours.decoder(tokens.transpose(1, 2).reshape(2, 24, 16, 16))
    assert expected.shape[-2:] == (224, 224) and expected.std() > 0.3  # BatchNorm passes the tokens on
    # Within float rounding: our grid comes in channels-last memory (a view of the tokens), theirs contiguous.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


# --- refusals -------------------------------------------------------------------------------------------------
def test_every_tensor_is_used_once_and_mismatches_name_the_key(pfm_checkpoint, tmp_path: Path) -> None:
    made = pfm_checkpoint()
    original = torch.load(made["checkpoint"], weights_only=False)

    def import_edited(edit, name: str):
        checkpoint = {**original, "model_state_dict": dict(original["model_state_dict"])}
        edit(checkpoint["model_state_dict"])
        torch.save(checkpoint, made["checkpoint"])
        return _import(made, tmp_path, name=name)

    with pytest.raises(WeightsMismatchError, match=r"missing decoder\.blocks\.0\.conv1\.1\.running_mean.*BatchNorm"):
        import_edited(lambda s: s.pop("decoder.blocks.0.conv1.1.running_mean"), "a")
    with pytest.raises(WeightsMismatchError, match=r"decoder\.extra\.weight"):
        import_edited(lambda s: s.update({"decoder.extra.weight": torch.zeros(3)}), "b")
    with pytest.raises(WeightsMismatchError, match=r"pfm\.blocks\.1\.attn\.qkv\.lora_a"):
        import_edited(lambda s: s.pop("pfm.blocks.1.attn.qkv.lora_a"), "c")
    with pytest.raises(WeightsMismatchError, match=r"decoder\.conv_more\.0\.weight is"):
        import_edited(lambda s: s.update({"decoder.conv_more.0.weight": torch.zeros(512, 7, 3, 3)}), "d")
    with pytest.raises(WeightsMismatchError, match=r"pfm\.blocks\.0\.mlp\.fc1\.lora_a"):
        import_edited(lambda s: s.update({"pfm.blocks.0.mlp.fc1.lora_a": torch.zeros(32, 4),
                                          "pfm.blocks.0.mlp.fc1.lora_b": torch.zeros(4, 128)}), "e")


def test_a_checkpoint_for_another_backbone_is_refused(pfm_checkpoint, tmp_path: Path) -> None:
    from hepatoquant.encoders import create_encoder

    # No backbone name in the file: its tensors' shapes give it away (32-wide LoRA, 192-wide ViT-Ti).
    made = pfm_checkpoint(backbone="test_vit_micro", pfm_name="")
    other = create_encoder("demo_vit_tiny")
    save_file({k: v.contiguous() for k, v in other.backbone.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"LoRA on 2 attention block.*the backbone has 12.*another backbone"):
        import_pfmseg(made["checkpoint"], backbone="demo_vit_tiny", backbone_weights=tmp_path / "other.safetensors",
                      classes=SEG_CLASS_NAMES, name="x", spacing_um_px=2.0, models_dir=tmp_path / "models")
    # With the name recorded in their config, it is refused before any weights load.
    made = pfm_checkpoint(backbone="test_vit_micro")
    with pytest.raises(WeightsMismatchError, match=r"trained on 'test_vit_micro'.*--backbone test_vit_micro"):
        import_pfmseg(made["checkpoint"], backbone="test_vit_micro_reg", backbone_weights=tmp_path / "absent.bin",
                      classes=SEG_CLASS_NAMES, name="x", spacing_um_px=2.0)
    # Their config names the foundation model: a Virchow2 checkpoint is refused for UNI before any weights load.
    named = pfm_checkpoint(pfm_name="virchow_v2")
    with pytest.raises(WeightsMismatchError, match=r"trained on 'virchow_v2'.*--backbone virchow2"):
        import_pfmseg(named["checkpoint"], backbone="uni", backbone_weights=tmp_path / "absent.bin",
                      classes=SEG_CLASS_NAMES, name="y", spacing_um_px=2.0)


@pytest.mark.parametrize(("their_name", "ours"), [("uni_v2", "uni2_h"), ("virchow_v1", "virchow"), ("phikon", "phikon"),
                                               ("phikon_v2", "phikon_v2"), ("hoptimus_0", "hoptimus0"),
                                               ("hoptimus_1", "hoptimus1"), ("conch_v1_5", "conch_v15"),
                                               ("lunit_vits8", "lunit_vits8")])
def test_every_zoo_backbone_is_known_by_pfm_segmentations_name(pfm_checkpoint, tmp_path: Path, their_name: str,
                                                               ours: str) -> None:
    """Issue 21: a checkpoint trained on any of their backbones that timm builds names our encoder for it (their
    names, configs/config.yaml of PFM_Segmentation), and that encoder is registered."""
    named = pfm_checkpoint(pfm_name=their_name)
    with pytest.raises(WeightsMismatchError, match=rf"trained on '{their_name}'.*--backbone {ours} with its weights"):
        import_pfmseg(named["checkpoint"], backbone="uni", backbone_weights=tmp_path / "absent.bin",
                      classes=SEG_CLASS_NAMES, name="y", spacing_um_px=2.0)


def test_full_fine_tunes_other_modes_and_bad_settings_are_refused(pfm_checkpoint, tmp_path: Path) -> None:
    made = pfm_checkpoint(mode="frozen", whole_model=True)
    checkpoint = torch.load(made["checkpoint"], weights_only=False)
    checkpoint["finetune_mode"] = "full"
    checkpoint["config"]["model"]["finetune_mode"]["type"] = "full"
    torch.save(checkpoint, made["checkpoint"])
    with pytest.raises(WeightsMismatchError, match="full fine-tune"):
        _import(made, tmp_path)
    checkpoint["finetune_mode"] = "dora"
    torch.save(checkpoint, made["checkpoint"])
    with pytest.raises(WeightsMismatchError, match="'dora' mode"):
        _import(made, tmp_path)

    made = pfm_checkpoint()
    with pytest.raises(InvalidParameterError, match="not a multiple of test_vit_micro's patch size 8"):
        _import(made, tmp_path, input_size_px=36)
    with pytest.raises(InvalidParameterError, match="takes 32 px inputs only"):
        _import(made, tmp_path, input_size_px=64)  # test_vit_micro has no dynamic image size
    with pytest.raises(InvalidParameterError, match=r"LoRA scaling 'alpha/2' is not one of alpha, alpha/r"):
        _import(made, tmp_path, lora_scaling="alpha/2")
    with pytest.raises(InvalidParameterError, match="has 3 output classes but --classes names 2"):
        _import(made, tmp_path, classes=("non_tumour", "tumour"))
    with pytest.raises(InvalidParameterError, match="background, non_tumour, tumour"):
        _import(made, tmp_path, classes=("background", "normal", "tumour"))
    with pytest.raises(InvalidParameterError, match=r"pack name '\.\.' is not allowed"):
        _import(made, tmp_path, name="..", overwrite=True)  # never a path out of the models folder
    _import(made, tmp_path, name="kept")
    with pytest.raises(ModelPackError, match="already exists"):
        _import(made, tmp_path, name="kept")


@pytest.mark.parametrize("kind", ["junk", "empty", "truncated", "pickled object"])
def test_a_file_that_is_not_their_checkpoint_is_refused_in_our_words(pfm_checkpoint, tmp_path: Path, kind: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Garbage, an empty file, a real checkpoint cut in half, a pickled object: our error, naming the file, never
    torch's advice to unpickle with weights_only=False (which would run code from the file)."""
    made = pfm_checkpoint()
    bad = tmp_path / f"{kind.replace(' ', '_')}.pth"
    if kind == "junk":
        bad.write_bytes(b"not a checkpoint, just text that someone saved as .pth")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        whole = made["checkpoint"].read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    else:
        torch.save({"model_state_dict": nn.Linear(2, 2), "epoch": 1}, bad)  # torch.save(model) pickles its class
    with pytest.raises(HepatoQuantError) as caught:
        import_pfmseg(bad, backbone="test_vit_micro", backbone_weights=made["weights"], classes=SEG_CLASS_NAMES,
                      name="z", spacing_um_px=2.0, models_dir=tmp_path / "models")
    message = str(caught.value)
    for torch_words in ("weights_only", "Re-running", "torch.load", "arbitrary code"):
        assert torch_words not in message
    expected = "not a complete PyTorch checkpoint of PFM_Segmentation: it is truncated" if kind == "truncated" else (
        "not a PyTorch checkpoint of PFM_Segmentation")
    assert str(bad) in message and expected in message
    if kind == "pickled object":
        assert "torch.nn.modules.linear.Linear" in message and "never unpickles code" in message
    assert isinstance(caught.value, ModelPackError)
    assert caught.value.__cause__ is None  # nor in a traceback
    assert main(["--models-dir", str(tmp_path / "models"), "models", "import-pfmseg", "--checkpoint", str(bad),
                 "--backbone", "test_vit_micro", "--backbone-weights", str(made["weights"]), "--classes", "background",
                 "non_tumour", "tumour", "--name", "z", "--spacing-um-px", "2"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("hepatoquant: error: ") and expected in err and "weights_only" not in err
    assert not (tmp_path / "models" / "z").exists()


def test_their_checkpoint_in_torchs_older_file_format_is_read(pfm_checkpoint, tmp_path: Path) -> None:
    made = pfm_checkpoint(alpha=8.0, lora_std=0.04, legacy_format=True)
    assert not made["checkpoint"].read_bytes().startswith(b"PK")
    _check_against_theirs(made, _import(made, tmp_path), 32)


@pytest.mark.parametrize("key", ["pfm.blocks.1.attn.proj.lora_b", "pfm.blocks.0.attn.qkv.lora_a"])
def test_a_missing_lora_tensor_is_named_not_blamed_on_the_backbone(pfm_checkpoint, tmp_path: Path, key: str) -> None:
    made = pfm_checkpoint()
    checkpoint = torch.load(made["checkpoint"], weights_only=False)
    del checkpoint["model_state_dict"][key]
    torch.save(checkpoint, made["checkpoint"])
    with pytest.raises(WeightsMismatchError) as caught:
        _import(made, tmp_path, lora_scaling="alpha")
    message = str(caught.value)
    assert f"missing LoRA tensor(s) {key} (1 of the 8 that the backbone's 4 LoRA layers need" in message
    assert "another backbone" not in message


def test_an_imported_pack_runs_on_openvino_as_in_pytorch_at_any_batch_size(pfm_checkpoint, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Their decoder's channels reordered, a class it lacks filled in: the graph OpenVINO converts (from one
    window) must hold that for any number of windows, with PyTorch's logits."""
    from hepatoquant.analysis import ModelCache

    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    pack = _import(pfm_checkpoint(num_classes=2), tmp_path, classes=("tumour", "non_tumour"))
    models = ModelCache()
    on_torch, on_openvino = models.segmenter(pack, CPU), models.segmenter(pack, CPU, "openvino", "fp32")
    size = pack.input_size_px
    for count in (3, 1):
        windows = torch.from_numpy(np.random.default_rng(count).integers(0, 256, (count, size, size, 3), np.uint8))
        with torch.inference_mode():
            expected = on_torch(windows)
        got = on_openvino(windows)
        assert got.shape == (count, len(SEG_CLASS_NAMES), size, size)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)
        assert (got[:, SEG_CLASS_NAMES.index("background")] == expected[:, 0]).all()  # the absent class's constant


# --- the commands, and the packs on the real slides -----------------------------------------------------------
def test_imported_packs_run_in_analyze_on_the_real_slides(pfm_checkpoint, tmp_path: Path, cmu_slide: Path,
                                                          tcga_slide: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = pfm_checkpoint(backbone="demo_vit_tiny", num_classes=2)
    models = tmp_path / "models"
    assert main(["--models-dir", str(models), "models", "import-pfmseg", "--checkpoint", str(made["checkpoint"]),
                 "--backbone", "demo_vit_tiny", "--backbone-weights", str(made["weights"]), "--classes",
                 "non_tumour,tumour", "--name", "paper-seg", "--spacing-um-px", "2"]) == 0
    assert "created segmenter pack 'paper-seg' (lora, LoRA rank 4 scale 2" in capsys.readouterr().out
    # A released linear head for the same encoder, in a training script's layout (module.fc.*), its outputs in
    # another order and named by display name.
    names = ["Steatosis", "tumour", "FIB", "Necrosis", "INF", "Normal tissue", "Bile duct reaction"]
    codes = ["STE", "TUM", "FIB", "NEC", "INF", "NOR", "REA"]
    torch.manual_seed(4)
    torch.save({"state_dict": {"module.fc.weight": torch.randn(7, 192) * 0.1, "module.fc.bias": torch.zeros(7)}},
               tmp_path / "released_head.pth")
    assert main(["--models-dir", str(models), "models", "import-head", str(tmp_path / "released_head.pth"),
                 "--encoder", "demo_vit_tiny", "--encoder-weights", str(made["weights"]), "--classes", *names,
                 "--name", "paper-head", "--tile-size-px", "224"]) == 0
    for slide, extra in ((cmu_slide, []), (tcga_slide, ["--mpp", "0.25"])):
        out = tmp_path / slide.stem
        assert main(["--models-dir", str(models), "analyze", str(slide), "--out", str(out), "--model", "paper-head",
                     "--seg-model", "paper-seg", "--device", "cpu", "--no-progress", *extra]) == 0
        report = json.loads(next(out.glob("*.report.json")).read_text())
        assert report["segmenter"]["name"] == "paper-seg" and report["segmentation"]["windows_run"] > 0
        assert report["segmenter"]["imported_from"]["format"] == "PFM_Segmentation"
        assert report["segmenter"]["imported_from"]["finetune_mode"] == "lora"
        assert report["model"]["name"] == "paper-head" and report["model"]["classes"] == codes
        assert report["tiles"]["count"] > 0 and report["parameters"]["tile_size_px"] == 224
    capsys.readouterr()
    assert main(["--models-dir", str(models), "models", "import-pfmseg", "--checkpoint", str(made["checkpoint"]),
                 "--backbone", "demo_vit_tiny", "--backbone-weights", str(made["weights"]), "--classes", "tumour",
                 "--name", "again", "--spacing-um-px", "2"]) == EXIT_USER_ERROR
    assert "has 2 output classes but --classes names 1" in capsys.readouterr().err
    assert main(["--models-dir", str(models), "models", "import-head", str(tmp_path / "released_head.pth"),
                 "--encoder", "demo_vit_tiny", "--encoder-weights", str(made["weights"]), "--classes",
                 "ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "--name", "crc"]) == EXIT_USER_ERROR
    assert "not one of them: ADI, BACK, DEB, LYM, MUC, MUS, NORM" in capsys.readouterr().err


def test_analyze_refuses_a_pack_whose_classes_are_not_hepatoquants(tiny_classifier_pack, tmp_path: Path,
                                                                 synthetic_slide: Path) -> None:
    """A HepatoBench probe on another dataset's classes is for benchmarks; `analyze` says so before reading tiles."""
    from hepatoquant.analysis import analyze_slide
    from hepatoquant.errors import ModelPackError
    from hepatoquant.pack_import import write_probe_pack

    crc = ("ADI", "DEB", "LYM")
    pack = write_probe_pack(tiny_classifier_pack, {"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}, name="crc",
                            classes=crc, description="probe on CRC classes", models_dir=tmp_path)
    with pytest.raises(ModelPackError, match="predicts ADI, DEB, LYM, which are not HepatoQuant tissue classes"):
        analyze_slide(synthetic_slide, pack)


@pytest.mark.parametrize("prefix", ["", "head.", "fc.", "classifier.", "linear.", "model.classifier."])
def test_import_head_finds_the_linear_layer_under_the_usual_prefixes(tiny_classifier_pack, tmp_path: Path,
                                                                     prefix: str) -> None:
    from hepatoquant.classify import load_classifier
    from hepatoquant.pack_import import add_model_pack

    weight, bias = torch.randn(3, 32), torch.randn(3)
    save_file({f"{prefix}weight": weight, f"{prefix}bias": bias}, str(tmp_path / "head.safetensors"))
    pack = add_model_pack(tiny_classifier_pack.encoder_weights, encoder="test_vit_micro", name="h",
                          models_dir=tmp_path / "models", head=tmp_path / "head.safetensors", classes=("TUM", "NOR", "FIB"))
    model = load_classifier(pack, CPU)
    assert torch.equal(model.head.weight, weight) and torch.equal(model.head.bias, bias)


def test_import_head_refuses_files_that_are_not_one_linear_layer(tiny_classifier_pack, tmp_path: Path) -> None:
    from hepatoquant.pack_import import add_model_pack

    def attempt(tensors: dict, classes=("TUM", "NOR", "FIB")):
        save_file(tensors, str(tmp_path / "head.safetensors"))
        return add_model_pack(tiny_classifier_pack.encoder_weights, encoder="test_vit_micro", name="h", overwrite=True,
                              models_dir=tmp_path / "models", head=tmp_path / "head.safetensors", classes=classes)

    with pytest.raises(WeightsMismatchError, match="one linear layer.*blocks.0.weight"):
        attempt({"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3), "blocks.0.weight": torch.zeros(2)})
    with pytest.raises(WeightsMismatchError, match=r"needs weight \(2, 32\).*the head has 3 outputs"):
        attempt({"fc.weight": torch.zeros(3, 32), "fc.bias": torch.zeros(3)}, classes=("TUM", "NOR"))
    with pytest.raises(WeightsMismatchError, match=r"needs weight \(3, 32\)"):
        attempt({"fc.weight": torch.zeros(3, 64), "fc.bias": torch.zeros(3)})  # trained on another encoder
    with pytest.raises(InvalidParameterError, match="each at most once"):
        attempt({"fc.weight": torch.zeros(3, 32), "fc.bias": torch.zeros(3)}, classes=("TUM", "Tumour", "FIB"))


@pytest.mark.parametrize("name, width, last_scale", [("uni", 1024, 2.0), ("virchow2", 1280, 1.75), ("gigapath", 1536, 2.0)])
def test_the_decoder_fits_the_published_backbones(name: str, width: int, last_scale: float) -> None:
    """Their 56 decoder and head tensors on the token width of UNI, Virchow2 and GigaPath (built on the meta device),
    and their last upsampling: 1.75 for patch-14 Virchow2, 2 for the patch-16 ones."""
    from hepatoquant.encoders import create_encoder

    backbone = create_encoder(name, device="meta").backbone
    decoder = PFMSegDecoder(backbone.embed_dim, backbone.patch_embed.patch_size[0], SEG_CLASS_NAMES)
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert len(shapes) == 56 and backbone.embed_dim == width
    assert shapes["decoder.conv_more.0.weight"] == (512, width, 3, 3)
    assert shapes["decoder.blocks.3.conv2.1.running_var"] == (16,)
    assert shapes["segmentation_head.0.weight"] == (3, 16, 3, 3)
    assert decoder.decoder.blocks[3].scale == last_scale and backbone.num_prefix_tokens == (5 if name == "virchow2" else 1)


# --- opt-in: UNI's architecture ---------------------------------------------------------------------------------
@pytest.mark.skipif(not HEAVY, reason="ViT-L/16 sized comparison (3.5 GB of memory, about a minute on a CPU): set "
                    "HEPATOQUANT_HEAVY_TESTS=1 to run it")
@pytest.mark.timeout(1800)
def test_a_uni_sized_checkpoint_computes_their_forward_pass_at_224_and_256_px(pfm_checkpoint, tmp_path: Path,
                                                                              record_property) -> None:
    """UNI's architecture (ViT-L/16, 24 blocks, 1024 wide; random weights with LayerScale 1 so that every block
    counts), LoRA of rank 16 on every qkv and proj as their config makes it, default scaling, their pfm_name. At
    256 px both models interpolate the position embeddings (dynamic image size, as they build UNI)."""
    made = pfm_checkpoint(backbone="uni", pfm_name="uni_v1", rank=16, alpha=2.0, lora_std=0.03)
    pack = _import(made, tmp_path, backbone="uni")
    assert pack.input_size_px == 224 and pack.manifest["training"]["imported_from"]["lora_scale"] == 2.0
    for size in (224, 256):
        for name, value in _check_against_theirs(made, pack, size).items():
            record_property(f"{name}_{size}px", value)
