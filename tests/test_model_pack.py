"""Model packs: the demo pack, manifest validation, lookup by name or path, adding packs, the `models` CLI."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch
from hepatoquant_client.classes import TISSUE_CLASS_CODES
from safetensors.torch import load_file

from hepatoquant import model_pack
from hepatoquant.cli import main
from hepatoquant.encoders import encoder_config, list_encoders, load_state_dict_file
from hepatoquant.errors import HepatoQuantError, ModelPackError, ModelPackNotFoundError, WeightsMismatchError
from hepatoquant.model_pack import (
    DEMO_PACK_NAME,
    MANIFEST_NAME,
    ModelPack,
    default_models_dir,
    ensure_demo_pack,
    list_model_packs,
    load_model_pack,
)
from hepatoquant.pack_import import add_model_pack
from hepatoquant import pack_lookup
from hepatoquant.pack_lookup import resolve_model_pack

TINY = "test_vit_micro"


def _schema() -> dict:
    return json.loads(resources.files("hepatoquant").joinpath("schemas/model_pack.schema.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _copy_pack(pack: ModelPack, dest: Path) -> Path:
    """A copy of ``pack`` in folder ``dest``, its manifest renamed to the folder's name (as packs are made)."""
    shutil.copytree(pack.path, dest)
    _edit_manifest(dest, lambda m: m.update(name=dest.name))
    return dest


def _edit_manifest(pack_dir: Path, edit) -> None:
    manifest_path = pack_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def _tree(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory``: relative path -> (mtime_ns, bytes)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --- the demo pack -----------------------------------------------------------------------------------------


def test_demo_pack_is_a_valid_untrained_classifier(tmp_path: Path) -> None:
    pack = ensure_demo_pack(tmp_path, encoder=TINY)
    assert pack.path == tmp_path / DEMO_PACK_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_PACK_NAME]  # no temporary folder left
    assert sorted(p.name for p in pack.path.iterdir()) == sorted(
        [MANIFEST_NAME, pack.encoder_weights.name, pack.head_weights.name]
    )
    manifest = json.loads((pack.path / MANIFEST_NAME).read_text())
    jsonschema.validate(manifest, _schema())
    assert manifest == pack.manifest
    assert pack.name == DEMO_PACK_NAME
    assert pack.kind == "classifier"
    assert pack.model_status == "untrained-demo" and pack.is_untrained_demo
    assert pack.encoder_name == TINY
    assert pack.classes == tuple(TISSUE_CLASS_CODES)
    config = encoder_config(TINY)
    assert pack.input_size_px == config.input_size_px
    assert pack.spacing_um_px == config.spacing_um_px
    assert pack.mean == pytest.approx(config.mean) and pack.std == pytest.approx(config.std)
    assert pack.tile_size_px == 150
    head = _tensors(pack.head_weights)
    assert set(head) == {"weight", "bias"}
    assert tuple(head["weight"].shape) == (len(TISSUE_CLASS_CODES), config.embedding_dim)
    assert tuple(head["bias"].shape) == (len(TISSUE_CLASS_CODES),)
    summary = pack.summary()
    assert summary["model_status"] == "untrained-demo"
    assert summary["encoder"] == TINY and summary["path"] == str(pack.path)
    assert load_model_pack(pack.path).manifest == pack.manifest


def test_demo_pack_is_made_once_and_then_reused(tmp_path: Path) -> None:
    first = ensure_demo_pack(tmp_path, encoder=TINY)
    before = _tree(tmp_path)
    torch.manual_seed(12345)  # a changed global seed must not matter
    second = ensure_demo_pack(tmp_path, encoder=TINY)
    assert second.path == first.path
    assert second.manifest == first.manifest
    assert _tree(tmp_path) == before  # same files, not rewritten


def test_demo_pack_is_deterministic(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = ensure_demo_pack(tmp_path / "a", encoder=TINY)
    torch.manual_seed(2)
    b = ensure_demo_pack(tmp_path / "b", encoder=TINY)
    assert _same_tensors(_tensors(a.encoder_weights), _tensors(b.encoder_weights))
    assert _same_tensors(_tensors(a.head_weights), _tensors(b.head_weights))
    # not trivially so: a pack made from other random weights differs
    assert not torch.equal(_tensors(a.head_weights)["weight"], torch.zeros_like(_tensors(a.head_weights)["weight"]))


def test_demo_pack_default_encoder_via_resolve(tmp_path: Path) -> None:
    pack = resolve_model_pack(DEMO_PACK_NAME, tmp_path)
    assert pack.path == tmp_path / DEMO_PACK_NAME
    assert pack.encoder_name == "demo_vit_tiny"
    assert pack.input_size_px == encoder_config("demo_vit_tiny").input_size_px
    assert pack.is_untrained_demo
    assert resolve_model_pack(DEMO_PACK_NAME, tmp_path).manifest == pack.manifest


# --- the models directory ----------------------------------------------------------------------------------


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(tmp_path / "mine"))
    assert default_models_dir() == tmp_path / "mine"
    monkeypatch.delenv("HEPATOQUANT_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_models_dir() == tmp_path / "xdg" / "hepatoquant" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".local" / "share" / "hepatoquant" / "models"


def test_resolve_uses_the_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_classifier_pack) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(tmp_path))
    _copy_pack(tiny_classifier_pack, tmp_path / "mypack")
    assert resolve_model_pack("mypack").path == tmp_path / "mypack"


# --- manifest and weight validation ------------------------------------------------------------------------


@pytest.fixture
def pack_dir(tmp_path: Path, tiny_classifier_pack: ModelPack) -> Path:
    """A private copy of the tiny classifier pack, to break."""
    return _copy_pack(tiny_classifier_pack, tmp_path / "pack")


def test_load_model_pack_reads_a_valid_pack(pack_dir: Path, tiny_classifier_pack: ModelPack) -> None:
    pack = load_model_pack(pack_dir)
    assert pack.path == pack_dir
    assert pack.manifest == {**tiny_classifier_pack.manifest, "name": "pack"}
    assert pack.encoder_weights == pack_dir / pack.manifest["encoder"]["weights"]


def test_a_folder_without_manifest_is_not_a_pack(tmp_path: Path) -> None:
    with pytest.raises(ModelPackNotFoundError) as info:
        load_model_pack(tmp_path)
    assert str(tmp_path) in str(info.value) and MANIFEST_NAME in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_manifest_that_is_not_json(pack_dir: Path) -> None:
    (pack_dir / MANIFEST_NAME).write_text('{"name": "pack",')
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    assert str(pack_dir / MANIFEST_NAME) in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_manifest_that_is_not_text(pack_dir: Path) -> None:
    (pack_dir / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00\x81garbage\x9c")
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    assert str(pack_dir / MANIFEST_NAME) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda m: m.pop("classes"), "classes"),
        (lambda m: m.pop("normalization"), "normalization"),
        (lambda m: m.update(kind="detector"), "kind"),
        (lambda m: m.pop("head"), "head"),  # a classifier without a head
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m["normalization"].update(std=[0.2, 0.0, 0.2]), "normalization/std/1"),
        (lambda m: m.update(classes=["TUM", "TUM"]), "classes"),
        (lambda m: m.update(surprise=1), "surprise"),
    ],
    ids=["missing-classes", "missing-normalization", "wrong-kind", "classifier-without-head", "format-version",
         "zero-std", "duplicate-classes", "unknown-field"],
)
def test_manifest_schema_errors(pack_dir: Path, edit, where: str) -> None:
    _edit_manifest(pack_dir, edit)
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    message = str(info.value)
    assert str(pack_dir / MANIFEST_NAME) in message
    assert "schema" in message
    assert where in message


def test_an_encoder_pack_needs_no_head(pack_dir: Path) -> None:
    (pack_dir / "head.safetensors").unlink()

    def to_encoder_pack(m: dict) -> None:
        m.pop("head")
        m.update(kind="encoder", model_status="pretrained-encoder")

    _edit_manifest(pack_dir, to_encoder_pack)
    pack = load_model_pack(pack_dir)
    assert pack.kind == "encoder" and pack.head_weights is None


@pytest.mark.parametrize("filename", ["encoder.safetensors", "head.safetensors"])
def test_missing_weight_file(pack_dir: Path, filename: str) -> None:
    (pack_dir / filename).unlink()
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    assert str(pack_dir) in str(info.value) and filename in str(info.value)


def test_unknown_encoder(pack_dir: Path) -> None:
    _edit_manifest(pack_dir, lambda m: m["encoder"].update(name="resnet_from_mars"))
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    message = str(info.value)
    assert str(pack_dir) in message and "resnet_from_mars" in message
    assert all(name in message for name in list_encoders())


def test_input_size_mismatch(pack_dir: Path) -> None:
    _edit_manifest(pack_dir, lambda m: m.update(input_size_px=64))
    with pytest.raises(ModelPackError) as info:
        load_model_pack(pack_dir)
    message = str(info.value)
    assert str(pack_dir) in message and "64" in message and str(encoder_config(TINY).input_size_px) in message


# --- finding packs -----------------------------------------------------------------------------------------


def test_resolve_by_name_and_by_path(tmp_path: Path, tiny_classifier_pack: ModelPack) -> None:
    models = tmp_path / "models"
    _copy_pack(tiny_classifier_pack, models / "liver")
    elsewhere = _copy_pack(tiny_classifier_pack, tmp_path / "elsewhere" / "pack")
    assert resolve_model_pack("liver", models).path == models / "liver"
    assert resolve_model_pack(str(elsewhere), models).path == elsewhere
    # a path wins over the models folder, and the demo pack is not made for it
    assert not (models / DEMO_PACK_NAME).exists()


def test_resolve_demo_makes_it_in_the_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = model_pack.ensure_demo_pack

    def tiny_demo(models_dir=None, *, encoder="demo_vit_tiny"):
        made.append(models_dir)
        return real(models_dir, encoder=TINY)

    monkeypatch.setattr(pack_lookup, "ensure_demo_pack", tiny_demo)
    pack = resolve_model_pack(DEMO_PACK_NAME, tmp_path)
    assert made == [tmp_path]
    assert pack.path == tmp_path / DEMO_PACK_NAME and pack.is_untrained_demo


def test_resolve_unknown_name_lists_the_packs(tmp_path: Path, tiny_classifier_pack: ModelPack) -> None:
    _copy_pack(tiny_classifier_pack, tmp_path / "alpha")
    _copy_pack(tiny_classifier_pack, tmp_path / "beta")
    with pytest.raises(ModelPackNotFoundError) as info:
        resolve_model_pack("gamma", tmp_path)
    message = str(info.value)
    assert "'gamma'" in message and str(tmp_path) in message
    assert "alpha, beta" in message
    assert DEMO_PACK_NAME in message  # what to do instead
    assert isinstance(info.value, FileNotFoundError)


def test_resolve_unknown_name_in_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelPackNotFoundError, match="none"):
        resolve_model_pack("gamma", tmp_path / "does-not-exist")


def test_list_shows_broken_packs_without_hiding_others(tmp_path: Path, tiny_classifier_pack: ModelPack) -> None:
    _copy_pack(tiny_classifier_pack, tmp_path / "alpha")
    broken = _copy_pack(tiny_classifier_pack, tmp_path / "broken")
    (broken / MANIFEST_NAME).write_text("{not json")
    no_weights = _copy_pack(tiny_classifier_pack, tmp_path / "delta")
    (no_weights / "encoder.safetensors").unlink()
    _copy_pack(tiny_classifier_pack, tmp_path / "gamma")
    (tmp_path / "notes").mkdir()  # not a pack: ignored
    (tmp_path / "readme.txt").write_text("hello")

    entries = list_model_packs(tmp_path)
    assert len(entries) == 4
    assert [e.path.name for e in entries if isinstance(e, ModelPack)] == ["alpha", "gamma"]
    errors = [e for e in entries if isinstance(e, ModelPackError)]
    assert len(errors) == 2
    assert str(broken) in str(errors[0]) and str(no_weights) in str(errors[1])
    assert list_model_packs(tmp_path / "nothing-here") == []


def test_list_uses_the_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_classifier_pack) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(tmp_path))
    _copy_pack(tiny_classifier_pack, tmp_path / "only")
    assert [p.path for p in list_model_packs()] == [tmp_path / "only"]


# --- adding packs ------------------------------------------------------------------------------------------


def _no_leftovers(models_dir: Path, *expected: str) -> None:
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(expected)


def test_add_encoder_pack_from_a_checkpoint(tmp_path: Path, make_tiny_checkpoint) -> None:
    checkpoint = make_tiny_checkpoint("pytorch_model.bin", seed=5)
    models = tmp_path / "models"
    pack = add_model_pack(checkpoint, encoder=TINY, name="micro", models_dir=models)
    assert pack.path == models / "micro"
    assert pack.kind == "encoder" and pack.model_status == "pretrained-encoder"
    assert pack.head_weights is None and "head" not in pack.manifest
    assert pack.encoder_name == TINY
    assert "pytorch_model.bin" in pack.manifest["description"]
    assert pack.manifest["licence_note"] == encoder_config(TINY).licence_note
    jsonschema.validate(pack.manifest, _schema())
    assert _same_tensors(_tensors(pack.encoder_weights), load_state_dict_file(checkpoint))
    assert load_model_pack(pack.path).manifest == pack.manifest
    _no_leftovers(models, "micro")


@pytest.mark.parametrize(
    ("checkpoint_name", "wrap", "head_name", "prefix"),
    [
        ("weights.safetensors", None, "head.safetensors", ""),
        ("checkpoint.pth", "state_dict", "probe.pt", "head."),
        ("checkpoint.pth", "model", "probe.bin", "fc."),
    ],
)
def test_add_classifier_pack_with_a_head(
    tmp_path: Path, make_tiny_checkpoint, make_linear_head, checkpoint_name, wrap, head_name, prefix
) -> None:
    checkpoint = make_tiny_checkpoint(checkpoint_name, seed=6, wrap=wrap)
    head = make_linear_head(head_name, dim=encoder_config(TINY).embedding_dim, prefix=prefix)
    models = tmp_path / "models"
    pack = add_model_pack(checkpoint, encoder=TINY, name="probe", models_dir=models, head=head, licence_note="mine")
    assert pack.kind == "classifier" and pack.model_status == "trained" and not pack.is_untrained_demo
    assert pack.manifest["licence_note"] == "mine"
    given = {k.removeprefix(prefix): v for k, v in load_state_dict_file(head).items()}
    assert _same_tensors(_tensors(pack.head_weights), given)
    assert _same_tensors(_tensors(pack.encoder_weights), load_state_dict_file(checkpoint))
    _no_leftovers(models, "probe")


def test_add_with_other_classes(tmp_path: Path, make_tiny_checkpoint, make_linear_head) -> None:
    """A head over some of HepatoQuant's tissue classes, in its own order, named by code or display name."""
    head = make_linear_head(dim=32, num_classes=3)
    pack = add_model_pack(
        make_tiny_checkpoint(), encoder=TINY, name="three", models_dir=tmp_path, head=head,
        classes=("STE", "tumour", "Bile duct reaction"),
    )
    assert pack.classes == ("STE", "TUM", "REA")


@pytest.mark.parametrize(("dim", "num_classes"), [(16, 7), (32, 6)])
def test_add_refuses_a_head_of_the_wrong_shape(tmp_path: Path, make_tiny_checkpoint, make_linear_head, dim, num_classes) -> None:
    head = make_linear_head(dim=dim, num_classes=num_classes)
    models = tmp_path / "models"
    with pytest.raises(WeightsMismatchError) as info:
        add_model_pack(make_tiny_checkpoint(), encoder=TINY, name="bad", models_dir=models, head=head)
    message = str(info.value)
    assert str(head) in message
    assert f"({num_classes}, {dim})" in message and "(7, 32)" in message
    assert not (models / "bad").exists()
    assert not models.exists() or not any(models.iterdir())


def test_add_refuses_a_head_with_other_tensors(tmp_path: Path, make_tiny_checkpoint) -> None:
    head = tmp_path / "two_layers.pt"
    torch.save({"0.weight": torch.zeros(7, 32), "0.bias": torch.zeros(7), "1.weight": torch.zeros(7, 7)}, head)
    with pytest.raises(WeightsMismatchError) as info:
        add_model_pack(make_tiny_checkpoint(), encoder=TINY, name="bad", models_dir=tmp_path / "m", head=head)
    assert str(head) in str(info.value) and "1.weight" in str(info.value)


def test_add_refuses_a_checkpoint_of_another_architecture(tmp_path: Path, make_tiny_checkpoint) -> None:
    checkpoint = make_tiny_checkpoint("reg.safetensors", encoder="test_vit_micro_reg")
    models = tmp_path / "models"
    with pytest.raises(WeightsMismatchError) as info:
        add_model_pack(checkpoint, encoder=TINY, name="bad", models_dir=models)
    assert str(checkpoint) in str(info.value)
    assert not models.exists() or not any(models.iterdir())


def test_add_refuses_an_existing_name_unless_overwrite(tmp_path: Path, make_tiny_checkpoint, make_linear_head) -> None:
    models = tmp_path / "models"
    first = add_model_pack(make_tiny_checkpoint("a.safetensors", seed=1), encoder=TINY, name="p", models_dir=models)
    before = _tree(models)
    second_checkpoint = make_tiny_checkpoint("b.safetensors", seed=2)
    with pytest.raises(ModelPackError) as info:
        add_model_pack(second_checkpoint, encoder=TINY, name="p", models_dir=models, head=make_linear_head())
    assert str(first.path) in str(info.value) and "already exists" in str(info.value)
    assert _tree(models) == before

    replaced = add_model_pack(
        second_checkpoint, encoder=TINY, name="p", models_dir=models, head=make_linear_head(), overwrite=True
    )
    assert replaced.path == first.path and replaced.kind == "classifier"
    assert _same_tensors(_tensors(replaced.encoder_weights), load_state_dict_file(second_checkpoint))
    _no_leftovers(models, "p")


@pytest.mark.parametrize("name", ["..", ".", "", "bad name", "a/b", "../escape"])
def test_add_refuses_a_name_that_is_not_a_plain_pack_name(tmp_path: Path, make_tiny_checkpoint, name: str) -> None:
    models = tmp_path / "area" / "models"
    models.mkdir(parents=True)
    sentinel = tmp_path / "area" / "keep.txt"
    sentinel.write_text("user data")
    (models / "keep.txt").write_text("user data")
    with pytest.raises(HepatoQuantError) as info:
        add_model_pack(make_tiny_checkpoint(), encoder=TINY, name=name, models_dir=models, overwrite=True)
    assert repr(name) in str(info.value)
    assert sentinel.read_text() == "user data" and (models / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in models.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in (tmp_path / "area").iterdir()) == ["keep.txt", "models"]


def test_a_failed_write_leaves_no_pack_and_no_temporary_folder(
    tmp_path: Path, make_tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    calls = []
    real_save = model_pack.save_file

    def save_then_fail(tensors, filename):
        calls.append(filename)
        real_save(tensors, filename)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_pack, "save_file", save_then_fail)
    with pytest.raises(ModelPackError) as info:
        add_model_pack(make_tiny_checkpoint(), encoder=TINY, name="half", models_dir=models)
    assert "half" in str(info.value) and "No space left" in str(info.value)
    assert calls  # the failure happened while writing
    assert not (models / "half").exists()
    assert list(models.iterdir()) == []


def test_packs_are_written_through_a_temporary_folder(
    tmp_path: Path, make_tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While files are written, the final pack folder does not exist yet (so nobody sees half a pack)."""
    models = tmp_path / "models"
    seen = []
    real_save = model_pack.save_file

    def watching_save(tensors, filename):
        seen.append((Path(filename).parent, (models / "atomic").exists()))
        real_save(tensors, filename)

    monkeypatch.setattr(model_pack, "save_file", watching_save)
    add_model_pack(make_tiny_checkpoint(), encoder=TINY, name="atomic", models_dir=models)
    assert seen and all(folder != models / "atomic" and not exists for folder, exists in seen)
    assert all(folder.parent == models for folder, _ in seen)  # same filesystem, so the rename is atomic
    _no_leftovers(models, "atomic")


# --- the `models` command line -----------------------------------------------------------------------------


@pytest.fixture
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


def test_cli_models_list(tmp_path: Path, tiny_classifier_pack: ModelPack, capsys, wide_terminal) -> None:
    _copy_pack(tiny_classifier_pack, tmp_path / "alpha")
    broken = _copy_pack(tiny_classifier_pack, tmp_path / "zeta")
    _edit_manifest(broken, lambda m: m.update(kind="detector"))

    assert main(["--models-dir", str(tmp_path), "models", "list"]) == 0
    out, err = capsys.readouterr()
    packs_table, encoders_table = out.split("Registered encoders")
    assert str(tmp_path) in packs_table
    alpha_lines = [line for line in packs_table.splitlines() if "alpha" in line]
    assert len(alpha_lines) == 1
    assert "classifier" in alpha_lines[0] and TINY in alpha_lines[0]
    assert f" {tiny_classifier_pack.model_status} " in alpha_lines[0]
    assert " ".join(TISSUE_CLASS_CODES) in alpha_lines[0]
    broken_lines = [line for line in packs_table.splitlines() if "broken" in line]
    assert len(broken_lines) == 1 and str(broken) in broken_lines[0] and "kind" in broken_lines[0]
    for name in list_encoders():
        line = next(line for line in encoders_table.splitlines() if f" {name} " in line)
        config = encoder_config(name)
        assert f" {config.input_size_px} " in line and f" {config.embedding_dim} " in line
    assert err == ""


def test_cli_models_list_uses_the_environment(monkeypatch, tmp_path: Path, tiny_classifier_pack, capsys, wide_terminal) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(tmp_path))
    _copy_pack(tiny_classifier_pack, tmp_path / "from-env")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "from-env" in out


def test_cli_models_add(tmp_path: Path, make_tiny_checkpoint, make_linear_head, capsys) -> None:
    models = tmp_path / "models"
    checkpoint = make_tiny_checkpoint("pytorch_model.bin")
    argv = ["--models-dir", str(models), "models", "add", str(checkpoint), "--encoder", TINY]
    assert main([*argv, "--name", "enc"]) == 0
    out, err = capsys.readouterr()
    assert "encoder pack 'enc'" in out and "pretrained-encoder" in out and str(models / "enc") in out
    assert load_model_pack(models / "enc").kind == "encoder"

    assert main([*argv, "--name", "clf", "--head", str(make_linear_head())]) == 0
    out, _ = capsys.readouterr()
    assert "classifier pack 'clf'" in out and "trained" in out
    assert load_model_pack(models / "clf").kind == "classifier"
    _no_leftovers(models, "clf", "enc")


def _one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("hepatoquant: error: ")
    return lines[0]


def test_cli_models_add_errors(tmp_path: Path, make_tiny_checkpoint, capsys) -> None:
    models = tmp_path / "models"
    wrong = make_tiny_checkpoint("reg.safetensors", encoder="test_vit_micro_reg")
    assert main(["--models-dir", str(models), "models", "add", str(wrong), "--encoder", TINY, "--name", "x"]) == 2
    assert str(wrong) in _one_line_error(capsys)
    assert not (models / "x").exists()

    right = make_tiny_checkpoint()
    assert main(["--models-dir", str(models), "models", "add", str(right), "--encoder", "nope", "--name", "x"]) == 2
    line = _one_line_error(capsys)
    assert "'nope'" in line and "uni" in line

    missing = tmp_path / "missing.bin"
    assert main(["--models-dir", str(models), "models", "add", str(missing), "--encoder", TINY, "--name", "x"]) == 2
    assert str(missing) in _one_line_error(capsys)

    assert main(["--models-dir", str(models), "models", "add", str(right), "--encoder", TINY, "--name", "x"]) == 0
    capsys.readouterr()
    assert main(["--models-dir", str(models), "models", "add", str(right), "--encoder", TINY, "--name", "x"]) == 2
    assert "already exists" in _one_line_error(capsys)


def test_cli_models_add_bad_name_is_a_user_error(tmp_path: Path, make_tiny_checkpoint, capsys) -> None:
    models = tmp_path / "models"
    argv = ["--models-dir", str(models), "models", "add", str(make_tiny_checkpoint()), "--encoder", TINY]
    assert main([*argv, "--name", "bad name"]) == 2
    assert "'bad name'" in _one_line_error(capsys)


@pytest.mark.parametrize(("encoder", "input_size", "loads"), [("uni", 256, True), ("uni", 250, False),
                                                              ("demo_vit_tiny", 256, False)])
def test_a_segmenter_pack_may_use_other_window_sizes_on_dynamic_encoders(tmp_path: Path, encoder: str,
                                                                         input_size: int, loads: bool) -> None:
    """PFM_Segmentation trains at 256 px on UNI; `import-pfmseg --input-size 256` wrote such a pack, which
    loading then refused. Other sizes: whole patches, on encoders built with dynamic image sizes only."""
    import json
    import shutil

    from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack

    demo = ensure_demo_segmentation_pack(tmp_path / "models")
    copy = tmp_path / "other-size"
    shutil.copytree(demo.path, copy)
    manifest = json.loads((copy / "hepatoquant-model.json").read_text())
    manifest["encoder"]["name"] = encoder
    manifest["input_size_px"] = input_size
    (copy / "hepatoquant-model.json").write_text(json.dumps(manifest))
    if loads:
        assert load_model_pack(copy).input_size_px == input_size
    else:
        with pytest.raises(ModelPackError, match=f"declares input {input_size} px"):
            load_model_pack(copy)
