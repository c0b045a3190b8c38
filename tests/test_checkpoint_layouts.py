"""Issue 21 (the encoder zoo): checkpoints saved by Hugging Face ``transformers`` (Phikon's ``ViTModel``, Phikon-v2's
``Dinov2Model``) load into timm's VisionTransformer and give transformers' own outputs.

The files are made by transformers itself (``save_pretrained``, which writes the published layout: transformers 5
renames the tensors in memory and back on saving), so the test checks our renaming against upstream's code, not
against our reading of it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from hepatoquant.checkpoint_layouts import to_timm_names
from hepatoquant.encoders import load_state_dict_file

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "image_size": 32}


def _saved(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    return load_state_dict_file(folder / "model.safetensors")


def _timm_vit(**kwargs) -> nn.Module:
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=0, **kwargs).eval()


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_a_transformers_vit_checkpoint_gives_transformers_outputs_in_timm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = ViTModel(ViTConfig(intermediate_size=64, **TINY)).eval()
    published = _saved(reference, tmp_path)
    assert "encoder.layer.0.attention.attention.query.weight" in published and "pooler.dense.weight" in published
    model = _timm_vit(mlp_ratio=2.0, norm_layer=partial(nn.LayerNorm, eps=1e-12))
    model.load_state_dict(to_timm_names(published, "transformers_vit"), strict=True)
    with torch.inference_mode():
        expected = reference(pixel_values=_pixels()).last_hidden_state
        torch.testing.assert_close(model.forward_features(_pixels()), expected, rtol=1e-5, atol=1e-5)


def test_a_transformers_dinov2_checkpoint_gives_transformers_outputs_in_timm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(mlp_ratio=4, layerscale_value=0.5, **TINY)).eval()
    with torch.no_grad():  # LayerScale different from its initial value, so that a dropped gamma shows
        for layer in reference.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.2, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.2, 2.0)
    published = _saved(reference, tmp_path)
    assert "encoder.layer.1.layer_scale2.lambda1" in published and "embeddings.mask_token" in published
    model = _timm_vit(init_values=1.0)
    model.load_state_dict(to_timm_names(published, "transformers_dinov2"), strict=True)
    with torch.inference_mode():
        expected = reference(pixel_values=_pixels()).last_hidden_state
        torch.testing.assert_close(model.forward_features(_pixels()), expected, rtol=1e-5, atol=1e-5)


def test_transformers_5_names_in_memory_are_renamed_too() -> None:
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(mlp_ratio=4, **TINY)).eval()
    in_memory = reference.state_dict()
    assert "encoder.layer.0.attention.q_proj.weight" in in_memory
    model = _timm_vit(init_values=1.0)
    model.load_state_dict(to_timm_names(in_memory, "transformers_dinov2"), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_features(_pixels()),
                                   reference(pixel_values=_pixels()).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_an_incomplete_attention_is_left_for_the_strict_load_to_name(tmp_path: Path) -> None:
    published = _saved(ViTModel(ViTConfig(intermediate_size=64, **TINY)), tmp_path)
    del published["encoder.layer.1.attention.attention.value.weight"]
    renamed = to_timm_names(published, "transformers_vit")
    assert "blocks.1.attn.qkv.weight" not in renamed and "encoder.layer.1.attention.attention.query.weight" in renamed
    with pytest.raises(RuntimeError, match="blocks.1.attn.qkv.weight"):
        _timm_vit(mlp_ratio=2.0).load_state_dict(renamed, strict=True)


def test_phikon_as_transformers_saves_it_loads_into_the_registered_encoder(tmp_path: Path) -> None:
    """The registered ``phikon`` (timm modules) with a file transformers writes for Phikon's config.json: same
    embedding as transformers' model (the class token of the last hidden state), on 86M real parameters. The
    LayerNorm eps is the 1e-6 its repository's config was changed to "to match timm"."""
    from hepatoquant.encoders import create_encoder

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6)
    reference = ViTModel(config).eval()  # with its pooler, as the published file
    reference.save_pretrained(tmp_path)
    encoder = create_encoder("phikon", weights=tmp_path / "model.safetensors")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 0]
        torch.testing.assert_close(encoder(pixels), expected, rtol=1e-4, atol=1e-4)
