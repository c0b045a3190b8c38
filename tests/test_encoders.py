"""The encoder registry: every entry builds, embeds, pools as its config says and loads weights strictly.

Large published models (UNI, Virchow2, Prov-GigaPath) are only ever built on the ``meta`` device; their
layouts are compared with ``published_checkpoints``, which is derived from the owners' published facts.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from published_checkpoints import (
    ARCHITECTURES,
    MODEL_NAMES,
    PREPROCESSING,
    PUBLISHED_PARAMETER_COUNTS,
    RECOMMENDED_EMBEDDING,
    ROUNDED_PUBLISHED_MILLIONS,
    TRANSFORMERS_CHECKPOINTS,
    expected_state_dict_shapes,
)
from safetensors.torch import save_file

from hepatoquant.encoders import Encoder, create_encoder, encoder_config, list_encoders, load_state_dict_file
from hepatoquant.errors import HepatoQuantError, InvalidParameterError, ModelPackError, WeightsMismatchError

# Above this many parameters an encoder is only built on the meta device in tests.
MAX_REAL_PARAMETERS = 10_000_000


@cache
def _meta_encoder(name: str) -> Encoder:
    """Built once per test session on the meta device (no memory); tests must not change it."""
    return create_encoder(name, device="meta")


def _parameter_count(name: str) -> int:
    return sum(p.numel() for p in _meta_encoder(name).parameters())


def _build_for_test(name: str) -> Encoder:
    """A real (CPU) encoder when small enough, else one on the meta device."""
    if _parameter_count(name) <= MAX_REAL_PARAMETERS:
        return create_encoder(name)
    return _meta_encoder(name)


def _pixels(encoder: Encoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = encoder.config.input_size_px
    device = next(encoder.parameters()).device
    if device.type == "meta":
        return torch.empty(batch, 3, size, size, device="meta")
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- the registry ------------------------------------------------------------------------------------------


def test_registry_holds_published_and_small_encoders() -> None:
    names = list_encoders()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert {"uni", "virchow2", "gigapath", "demo_vit_tiny", "test_vit_micro", "test_vit_micro_reg"} <= set(names)


@pytest.mark.parametrize("name", list_encoders())
def test_registry_entry_builds_and_gives_embedding_of_config_size(name: str) -> None:
    config = encoder_config(name)
    assert config.name == name
    assert config.pooling in ("cls", "cls+mean_patch", "attentional")
    assert config.input_size_px % config.patch_size_px == 0
    assert len(config.mean) == 3 and len(config.std) == 3 and all(s > 0 for s in config.std)
    assert config.spacing_um_px > 0
    assert config.licence_note

    encoder = _build_for_test(name)
    assert isinstance(encoder, Encoder)
    assert encoder.config is config
    assert not encoder.training
    assert not _meta_encoder(name).training

    pixels = _pixels(encoder)
    tokens = encoder.forward_tokens(pixels)
    grid = config.input_size_px // config.patch_size_px
    assert tuple(tokens.shape) == (2, encoder.num_prefix_tokens + grid * grid, encoder.backbone.embed_dim)
    if config.pooling != "attentional":  # the learned pooler (CONCH v1.5) has a width of its own
        assert config.embedding_dim == encoder.backbone.embed_dim * (1 if config.pooling == "cls" else 2)

    embedding = encoder(pixels)
    assert tuple(embedding.shape) == (2, config.embedding_dim)
    if embedding.device.type != "meta":
        assert embedding.dtype == torch.float32
        assert torch.isfinite(embedding).all()
        # Different tiles give different embeddings (the model is not constant).
        assert not torch.allclose(embedding[0], embedding[1])


@pytest.mark.parametrize("name", list_encoders())
def test_meta_build_allocates_nothing(name: str) -> None:
    encoder = create_encoder(name, device="meta")
    assert all(p.device.type == "meta" for p in encoder.parameters())
    assert all(b.device.type == "meta" for b in encoder.buffers())
    # the config says whether other input sizes work (segmenter packs rely on it) as the built model does
    assert encoder_config(name).dynamic_img_size == bool(getattr(encoder.backbone, "dynamic_img_size", False))


@pytest.mark.parametrize(
    "name",
    [n for n in list_encoders() if encoder_config(n).pooling == "cls" and _parameter_count(n) <= MAX_REAL_PARAMETERS],
)
def test_cls_pooling_is_the_class_token_and_matches_timm_pooling(name: str) -> None:
    encoder = create_encoder(name)
    pixels = _pixels(encoder, batch=3)
    with torch.no_grad():
        tokens = encoder.forward_tokens(pixels)
        embedding = encoder(pixels)
        timm_pooled = encoder.backbone(pixels)
    torch.testing.assert_close(embedding, tokens[:, 0])
    torch.testing.assert_close(embedding, timm_pooled)


def test_cls_mean_patch_pooling_excludes_register_tokens() -> None:
    encoder = create_encoder("test_vit_micro_reg")
    assert encoder.config.pooling == "cls+mean_patch"
    assert encoder.num_prefix_tokens == 3  # class token + 2 register tokens
    pixels = _pixels(encoder, batch=3)
    with torch.no_grad():
        tokens = encoder.forward_tokens(pixels)
        embedding = encoder(pixels)
    grid = encoder.config.input_size_px // encoder.config.patch_size_px
    assert tokens.shape[1] == 3 + grid * grid
    expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(embedding, expected)
    # The register tokens matter: including them would give a different embedding.
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
    assert not torch.allclose(embedding, with_registers)


def test_pool_on_known_tokens() -> None:
    encoder = create_encoder("test_vit_micro_reg", device="meta")
    # batch 1, 3 prefix tokens + 2 patch tokens, width 2
    tokens = torch.tensor([[[1.0, 2.0], [100.0, 100.0], [200.0, 200.0], [3.0, 5.0], [5.0, 9.0]]])
    assert encoder.pool(tokens).tolist() == [[1.0, 2.0, 4.0, 7.0]]
    cls_encoder = create_encoder("test_vit_micro", device="meta")
    assert cls_encoder.pool(tokens).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("call", [create_encoder, encoder_config])
def test_unknown_encoder_name_lists_the_registered_ones(call) -> None:
    with pytest.raises(InvalidParameterError) as info:
        call("not_an_encoder")
    message = str(info.value)
    assert "'not_an_encoder'" in message
    for name in list_encoders():
        assert name in message
    assert isinstance(info.value, ValueError)


# --- the published architectures, checked on the meta device ----------------------------------------------


@pytest.fixture(scope="module", params=MODEL_NAMES)
def published(request: pytest.FixtureRequest) -> tuple[str, Encoder]:
    return request.param, _meta_encoder(request.param)


def test_published_state_dict_names_and_shapes(published: tuple[str, Encoder]) -> None:
    name, encoder = published
    actual = {k: tuple(v.shape) for k, v in encoder.backbone.state_dict().items()}
    expected = expected_state_dict_shapes(name)
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = {k: (actual[k], expected[k]) for k in set(actual) & set(expected) if actual[k] != expected[k]}
    assert (missing, unexpected, wrong) == ([], [], {})


def test_published_parameter_count(published: tuple[str, Encoder]) -> None:
    name, encoder = published
    assert sum(p.numel() for p in encoder.backbone.parameters()) == PUBLISHED_PARAMETER_COUNTS[name]
    # every state-dict entry is a parameter (no buffers a checkpoint would lack)
    assert set(encoder.backbone.state_dict()) == {n for n, _ in encoder.backbone.named_parameters()}


@pytest.mark.parametrize("name", sorted(ROUNDED_PUBLISHED_MILLIONS))
def test_exact_counts_round_to_the_owners_figures(name: str) -> None:
    """Where owners publish only a rounded count, the exact one derived from their architecture rounds to it."""
    millions, decimals = ROUNDED_PUBLISHED_MILLIONS[name]
    assert round(_parameter_count(name) / 1e6, decimals) == millions


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CHECKPOINTS))
def test_transformers_checkpoints_fit_after_renaming(name: str) -> None:
    """Phikon's and Phikon-v2's files are written by transformers: its own model, built on the meta device from
    the published config, gives the file's names and shapes (``revert_weight_conversion`` is what
    ``save_pretrained`` writes); renamed into timm's, they are exactly our encoder's."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel
    from transformers.core_model_loading import revert_weight_conversion

    from hepatoquant.checkpoint_layouts import to_timm_names

    facts = ARCHITECTURES[name]
    common = {"hidden_size": facts["embed_dim"], "num_hidden_layers": facts["depth"],
              "num_attention_heads": facts["num_heads"], "patch_size": facts["patch_size"],
              "image_size": facts["img_size"], "qkv_bias": facts["qkv_bias"]}
    with torch.device("meta"):
        if TRANSFORMERS_CHECKPOINTS[name] == "transformers_vit":
            reference = ViTModel(ViTConfig(intermediate_size=facts["mlp_fc1_out"], **common))  # with its pooler
        else:
            reference = Dinov2Model(Dinov2Config(mlp_ratio=facts["mlp_fc1_out"] // facts["embed_dim"], **common))
    published = revert_weight_conversion(reference, reference.state_dict())
    assert any(".attention.attention.query." in key for key in published)  # the names of the files
    renamed = {k: tuple(v.shape) for k, v in to_timm_names(published, TRANSFORMERS_CHECKPOINTS[name]).items()}
    ours = {k: tuple(v.shape) for k, v in _meta_encoder(name).backbone.state_dict().items()}
    assert renamed == ours
    assert encoder_config(name).checkpoint_layout == TRANSFORMERS_CHECKPOINTS[name]


def test_published_preprocessing_and_embedding(published: tuple[str, Encoder]) -> None:
    name, encoder = published
    config = encoder.config
    channels, height, width = PREPROCESSING[name]["input_size"]
    assert (3, config.input_size_px, config.input_size_px) == (channels, height, width)
    assert config.mean == pytest.approx(PREPROCESSING[name]["mean"])
    assert config.std == pytest.approx(PREPROCESSING[name]["std"])
    assert config.patch_size_px == ARCHITECTURES[name]["patch_size"]
    assert config.embedding_dim == RECOMMENDED_EMBEDDING[name]["dim"]
    expected_prefix = 1 + ARCHITECTURES[name]["reg_tokens"]
    assert encoder.num_prefix_tokens == expected_prefix
    assert encoder.num_prefix_tokens == RECOMMENDED_EMBEDDING[name].get("num_prefix_tokens", 1)
    # Pooling as the card prescribes: Virchow and Virchow2 are cls + mean of patch tokens, the others the class token.
    assert config.pooling == RECOMMENDED_EMBEDDING[name].get("pooling", "cls")

    pixels = torch.empty(1, 3, height, width, device="meta")
    tokens = encoder.forward_tokens(pixels)
    num_patches = (height // ARCHITECTURES[name]["patch_size"]) ** 2
    assert tuple(tokens.shape) == (1, expected_prefix + num_patches, ARCHITECTURES[name]["embed_dim"])
    assert tuple(encoder(pixels).shape) == (1, RECOMMENDED_EMBEDDING[name]["dim"])


def test_published_facts_a_state_dict_cannot_show(published: tuple[str, Encoder]) -> None:
    name, encoder = published
    facts = ARCHITECTURES[name]
    blocks = list(encoder.backbone.blocks)
    assert len(blocks) == facts["depth"]
    for block in blocks:
        assert block.attn.num_heads == facts["num_heads"]
        assert block.attn.head_dim == facts["embed_dim"] // facts["num_heads"]
        assert type(block.mlp.act).__name__ == facts["activation"]
        if facts["mlp"] == "plain":
            assert type(block.mlp) is timm.layers.Mlp
        else:
            assert facts["mlp"] == "swiglu_packed"
            # timm.layers.SwiGLUPacked = GluMlp(act_layer=SiLU, gate_last=False): the fused fc1's halves
            # are (gate, value) in that order, which a state dict cannot show either.
            assert type(block.mlp) is timm.layers.GluMlp
            assert block.mlp.gate_last is False
            assert block.mlp.chunk_dim == -1


# --- weight loading ----------------------------------------------------------------------------------------


def _outputs(encoder: Encoder, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return encoder(_pixels(encoder, batch=2, seed=seed))


@pytest.mark.parametrize(
    ("filename", "wrap"),
    [
        ("weights.safetensors", None),
        ("pytorch_model.bin", None),
        ("checkpoint.pth", "state_dict"),
        ("checkpoint.pt", "model"),
    ],
)
@pytest.mark.parametrize("name", ["test_vit_micro", "test_vit_micro_reg"])
def test_weights_load_and_reproduce_the_original(
    make_tiny_checkpoint, build_tiny_encoder, name: str, filename: str, wrap
) -> None:
    path = make_tiny_checkpoint(filename, encoder=name, seed=7, wrap=wrap)
    original = build_tiny_encoder(name, seed=7)
    loaded = create_encoder(name, weights=path)
    assert isinstance(loaded, Encoder)
    assert not loaded.training
    assert all(isinstance(p, torch.nn.Parameter) and p.device.type == "cpu" for p in loaded.parameters())
    assert {n for n, _ in loaded.named_parameters()} == {n for n, _ in original.named_parameters()}
    assert torch.equal(_outputs(loaded), _outputs(original))
    # ... and a str path works the same
    assert torch.equal(_outputs(create_encoder(name, weights=str(path))), _outputs(original))
    # The equality means something: another random model gives other outputs.
    other = build_tiny_encoder(name, seed=8)
    assert not torch.allclose(_outputs(other), _outputs(original), atol=1e-3)
    # ... and the tiles of a batch get different embeddings (the comparison is not of constants).
    assert not torch.allclose(_outputs(original)[0], _outputs(original)[1], atol=1e-3)


def test_load_state_dict_file_reads_wrapped_checkpoints(make_tiny_checkpoint) -> None:
    plain = load_state_dict_file(make_tiny_checkpoint("a.safetensors", seed=3))
    wrapped = load_state_dict_file(make_tiny_checkpoint("b.bin", seed=3, wrap="state_dict"))
    assert set(plain) == set(wrapped)
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)


def _save(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture
def micro_state_dict() -> dict[str, torch.Tensor]:
    return create_encoder("test_vit_micro").backbone.state_dict()


def test_weights_of_another_architecture_are_refused(make_tiny_checkpoint) -> None:
    path = make_tiny_checkpoint("reg.safetensors", encoder="test_vit_micro_reg")
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "'test_vit_micro'" in message
    assert "unexpected" in message and "reg_token" in message
    assert "other shapes" in message  # the SwiGLU fc1 is twice as wide


def test_weights_with_a_missing_key_are_refused(tmp_path: Path, micro_state_dict) -> None:
    del micro_state_dict["norm.weight"]
    path = _save(tmp_path / "missing.safetensors", micro_state_dict)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing" in message and "norm.weight" in message
    assert "unexpected" not in message and "other shapes" not in message


def test_weights_with_a_wrong_shape_are_refused(tmp_path: Path, micro_state_dict) -> None:
    micro_state_dict["cls_token"] = torch.zeros(1, 1, 16)
    path = _save(tmp_path / "shape.safetensors", micro_state_dict)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "cls_token" in message and "(1, 1, 16)" in message and "(1, 1, 32)" in message
    assert "missing" not in message


def test_weights_with_an_extra_key_are_refused(tmp_path: Path, micro_state_dict) -> None:
    micro_state_dict["head.weight"] = torch.zeros(7, 32)
    path = tmp_path / "extra.bin"
    torch.save(micro_state_dict, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "1 unexpected" in message and "head.weight" in message


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "pytorch_model.bin"
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)
    assert isinstance(info.value, HepatoQuantError) and isinstance(info.value, ModelPackError)


@pytest.mark.parametrize("filename", ["notes.bin", "notes.pth", "notes.safetensors"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, filename: str) -> None:
    path = tmp_path / filename
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("filename", ["cut.safetensors", "cut.bin"])
def test_a_truncated_checkpoint_is_refused(make_tiny_checkpoint, filename: str) -> None:
    path = make_tiny_checkpoint(filename)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    assert str(path) in str(info.value)


def test_a_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "training_state.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    assert str(path) in str(info.value)
    assert "state dict of tensors" in str(info.value)


class _NotAllowed:
    """A pickled object that ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_a_pickle_of_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"thing": _NotAllowed()}, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder("test_vit_micro", weights=path)
    assert str(path) in str(info.value)
    assert "not a readable PyTorch checkpoint" in str(info.value)


def test_conch_v15s_attentional_pooler_is_multi_head_attention_of_a_learned_query() -> None:
    """The pooler (CoCa's, as CONCH v1.5's code writes it: q = to_q(ln_q(query)), k, v = to_kv(ln_k(tokens)), 8
    heads, no biases, to_out) computes what PyTorch's own nn.MultiheadAttention computes with those weights."""
    from hepatoquant.attentional_pooling import AttentionalPooler

    torch.manual_seed(0)
    pooler = AttentionalPooler(d_model=48, context_dim=64, n_head=8, n_queries=1).eval()
    with torch.no_grad():
        for parameter in pooler.parameters():
            parameter.normal_(0, 0.5)
    reference = torch.nn.MultiheadAttention(48, 8, bias=False, kdim=64, vdim=64, batch_first=True).eval()
    with torch.no_grad():
        reference.q_proj_weight.copy_(pooler.to_q.weight)
        reference.k_proj_weight.copy_(pooler.to_kv.weight[:48])
        reference.v_proj_weight.copy_(pooler.to_kv.weight[48:])
        reference.out_proj.weight.copy_(pooler.to_out.weight)
    tokens = torch.randn(3, 17, 64)
    with torch.inference_mode():
        query = pooler.ln_q(pooler.query).expand(3, -1, -1)
        keys = pooler.ln_k(tokens)
        expected, _ = reference(query, keys, keys, need_weights=False)
        torch.testing.assert_close(pooler(tokens), expected, rtol=1e-5, atol=1e-5)


def test_conch_v15_embeds_through_its_pooler_and_segments_from_its_trunks_tokens() -> None:
    encoder = _meta_encoder("conch_v15")
    pixels = torch.empty(2, 3, 448, 448, device="meta")
    tokens = encoder.forward_tokens(pixels)
    assert tuple(tokens.shape) == (2, 1 + 28 * 28, 1024)  # PFM_Segmentation: trunk.forward_features(x)[:, 1:]
    assert tuple(encoder(pixels).shape) == (2, 768)
    assert encoder.backbone.blocks is encoder.backbone.trunk.blocks
    assert tuple(encoder.forward_tokens(torch.empty(1, 3, 224, 224, device="meta")).shape) == (1, 197, 1024)
