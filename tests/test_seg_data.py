"""Segmentation training data: the PFM pair list, image / mask pairs, windows from annotated slides, augmentation."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hepatoquant.errors import InvalidParameterError, RegionsError
from hepatoquant.segmentation.data import (
    PairDataset,
    SlideWindowDataset,
    eval_transforms,
    load_pair_list,
    train_transforms,
)
from hepatoquant.synthetic import Ellipse, default_tissue

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # identity normalisation: images stay in [0, 1]
VALID = {0, 1, 2, 255}


# -- the PFM pair list and PairDataset ----------------------------------------------------------------------


def _write_pair(folder: Path, name: str, size: tuple[int, int] = (40, 30), mask_size: tuple[int, int] | None = None,
                values: tuple[int, ...] = (0, 1, 2, 255)) -> tuple[Path, Path]:
    """An RGB PNG whose brightness encodes the label, and an 8-bit label mask (stripes of ``values``)."""
    width, height = mask_size or size
    mask = np.zeros((height, width), np.uint8)
    for i, value in enumerate(values):
        mask[:, i * width // len(values) : (i + 1) * width // len(values)] = value
    image = np.zeros((size[1], size[0], 3), np.uint8)
    image[..., 0] = 200
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(mask, mode="L").save(folder / f"{name}_mask.png")
    return folder / f"{name}.png", folder / f"{name}_mask.png"


def _write_list(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_pfm_list_resolves_relative_paths_and_serves_pairs(tmp_path: Path) -> None:
    _write_pair(tmp_path / "images", "a")
    _write_pair(tmp_path / "images", "b", size=(50, 20))
    absolute_image, absolute_mask = _write_pair(tmp_path / "elsewhere", "c")
    listing = _write_list(tmp_path / "dataset.json", {
        "num_classes": 3,
        "data": {
            "train": [
                {"image_path": "images/a.png", "mask_path": "images/a_mask.png"},
                {"image_path": "images/b.png", "mask_path": "images/b_mask.png"},
            ],
            "val": [{"image_path": str(absolute_image), "mask_path": str(absolute_mask)}],
        },
    })
    pairs = load_pair_list(listing)
    assert set(pairs) == {"train", "val", "test"} and pairs["test"] == []
    assert pairs["train"][1] == (tmp_path / "images" / "b.png", tmp_path / "images" / "b_mask.png")
    assert pairs["val"] == [(absolute_image, absolute_mask)]

    dataset = PairDataset(pairs["train"], eval_transforms(32, MEAN, STD))
    assert len(dataset) == 2
    for index in range(2):
        image, mask = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert mask.dtype == torch.int64 and mask.shape == (32, 32)
        assert set(mask.unique().tolist()) == VALID  # all four stripes survive, nothing in between
        assert image[0].mean().item() == pytest.approx(200 / 255, abs=1e-3)
    normalised, _ = PairDataset(pairs["train"], eval_transforms(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))[0]
    assert normalised[1].mean().item() == pytest.approx(-2.0, abs=1e-3)  # (0 - 0.5) / 0.25


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"num_classes": 3, "data": {"train": [}', "not valid JSON"),
        ({"data": {"train": []}}, "'num_classes' and 'data'"),
        ({"num_classes": 3}, "'num_classes' and 'data'"),
        ({"num_classes": 2, "data": {}}, "0 background, 1 non_tumour, 2 tumour"),
        ({"num_classes": 3, "data": {"valid": []}}, "unknown split(s) 'valid'"),
        ({"num_classes": 3, "data": {"train": [{"image_path": "images/a.png"}]}}, "data.train[0]"),
    ],
)
def test_bad_pair_lists_are_errors_naming_the_file(tmp_path: Path, content: object, expected: str) -> None:
    _write_pair(tmp_path / "images", "a")
    listing = _write_list(tmp_path / "dataset.json", content)
    with pytest.raises(InvalidParameterError) as info:
        load_pair_list(listing)
    assert expected in str(info.value) and str(listing) in str(info.value)


@pytest.mark.parametrize("missing", ["image_path", "mask_path"])
def test_missing_image_or_mask_file_is_an_error_naming_the_entry(tmp_path: Path, missing: str) -> None:
    _write_pair(tmp_path / "images", "a")
    entry = {"image_path": "images/a.png", "mask_path": "images/a_mask.png", missing: "images/gone.png"}
    listing = _write_list(tmp_path / "dataset.json", {
        "num_classes": 3, "data": {"train": [{"image_path": "images/a.png", "mask_path": "images/a_mask.png"}],
                                   "test": [entry]},
    })
    with pytest.raises(InvalidParameterError) as info:
        load_pair_list(listing)
    message = str(info.value)
    assert "data.test[0]" in message and str(tmp_path / "images" / "gone.png") in message
    assert "JSON file's folder" in message and missing.split("_")[0] in message


def test_missing_list_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="does not exist"):
        load_pair_list(tmp_path / "nope.json")


def test_mask_of_another_size_is_an_error_naming_both_files(tmp_path: Path) -> None:
    image, mask = _write_pair(tmp_path, "a", size=(40, 30), mask_size=(20, 15))
    with pytest.raises(InvalidParameterError) as info:
        PairDataset([(image, mask)], eval_transforms(16, MEAN, STD))[0]
    message = str(info.value)
    assert str(image) in message and str(mask) in message and "20 x 15" in message and "40 x 30" in message


def test_unknown_label_values_are_an_error_naming_them(tmp_path: Path) -> None:
    image, mask = _write_pair(tmp_path, "a", values=(0, 1, 3, 7))
    with pytest.raises(InvalidParameterError) as info:
        PairDataset([(image, mask)], eval_transforms(16, MEAN, STD))[0]
    assert str(mask) in str(info.value) and "3, 7" in str(info.value)


def test_colour_mask_is_an_error(tmp_path: Path) -> None:
    image, _ = _write_pair(tmp_path, "a")
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[:, :20] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(InvalidParameterError, match="single-channel"):
        PairDataset([(image, tmp_path / "colour.png")], eval_transforms(16, MEAN, STD))[0]


def test_palette_mask_gives_its_indices(tmp_path: Path) -> None:
    image, _ = _write_pair(tmp_path, "a")
    labels = np.zeros((30, 40), np.uint8)
    labels[10:20, 10:30] = 2
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 0, 255, 0, 255, 0, 0] + [0] * (253 * 3))
    palette.save(tmp_path / "palette.png")
    _, mask = PairDataset([(image, tmp_path / "palette.png")], eval_transforms(40, MEAN, STD))[0]
    assert set(mask.unique().tolist()) == {0, 2}


# -- augmentation -------------------------------------------------------------------------------------------


def _square_pair() -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A bright square in the top-left quadrant of a dark image; the mask has 2 there, 255 on a bottom stripe."""
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[:, 8:24, 4:28] = 255
    mask = torch.ones(64, 64, dtype=torch.uint8)
    mask[8:24, 4:28] = 2
    mask[60:, :] = 255
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def test_train_transforms_keep_labels_and_alignment() -> None:
    transform = train_transforms(48, MEAN, STD)
    torch.manual_seed(0)
    quadrants = set()
    for _ in range(40):
        image, mask = transform(*_square_pair())
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert mask.shape == (48, 48) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= VALID
        bright = image.mean(0) > 0.5
        square = mask == 2
        if square.sum() < 20:
            continue
        iou = (bright & square).sum().item() / (bright | square).sum().item()
        assert iou > 0.85, "the image's bright square and the mask's label square moved apart"
        ys, xs = torch.nonzero(square, as_tuple=True)
        quadrants.add((bool(ys.float().mean() > 24), bool(xs.float().mean() > 24)))
    assert len(quadrants) >= 3  # flips and rotations really moved the square around


def test_train_transforms_jitter_colour_but_not_labels() -> None:
    transform = train_transforms(64, MEAN, STD)
    torch.manual_seed(1)
    images = [transform(*_square_pair())[0] for _ in range(10)]
    spread = torch.stack([img.amax() for img in images])
    assert spread.max() - spread.min() > 0.005  # colour changes from one draw to the next


def test_eval_transforms_resize_masks_nearest() -> None:
    image, mask = _square_pair()
    out_image, out_mask = eval_transforms(25, MEAN, STD)(image, mask)
    assert out_image.shape == (3, 25, 25) and out_mask.shape == (25, 25)
    assert set(out_mask.unique().tolist()) == {1, 2, 255}  # no blended values at the edges
    again_image, again_mask = eval_transforms(25, MEAN, STD)(image, mask)
    assert torch.equal(out_image, again_image) and torch.equal(out_mask, again_mask)


# -- windows from annotated slides --------------------------------------------------------------------------

TUMOUR = Ellipse(600, 900, 220, 260)  # the synthetic_slide fixture's tumour
NORMAL_BOX = (1200, 900, 1700, 1600)  # a "Normal" annotation on the second tissue piece


def _ellipse_ring(ellipse: Ellipse, points: int = 128) -> list[list[float]]:
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    ring = [[ellipse.cx + ellipse.rx * math.cos(a), ellipse.cy + ellipse.ry * math.sin(a)] for a in angles]
    return ring + [ring[0]]


def _annotation(ring: list[list[float]], class_name: str) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": class_name, "color": [200, 0, 0]}},
    }


def _box_ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


@pytest.fixture(scope="module")
def annotations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("annotations") / "slide.geojson"
    features = [_annotation(_ellipse_ring(TUMOUR), "Tumor"), _annotation(_box_ring(*NORMAL_BOX), "Normal")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _dataset(slide: Path, annotations: Path, **kwargs) -> SlideWindowDataset:
    options = {"input_size_px": 64, "windows_per_slide": 12, "transform": eval_transforms(64, MEAN, STD), "seed": 3}
    return SlideWindowDataset([(slide, annotations)], **(options | kwargs))


@pytest.fixture(scope="module")
def windows(synthetic_slide: Path, annotations: Path) -> SlideWindowDataset:
    return _dataset(synthetic_slide, annotations)


def _pixel_centres(dataset: SlideWindowDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (x, y) of the centres of a window's output pixels, as (size, size) grids."""
    window = dataset.windows[index]
    step = window.side_level0_px / dataset.input_size_px
    centres = (np.arange(dataset.input_size_px) + 0.5) * step
    return np.meshgrid(window.x_level0_px + centres, window.y_level0_px + centres)


def _inside(ellipse: Ellipse, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
    """Inside ``ellipse`` grown (margin > 0) or shrunk (margin < 0) by about ``margin`` level-0 px."""
    grown = Ellipse(ellipse.cx, ellipse.cy, ellipse.rx + margin, ellipse.ry + margin)
    return grown.contains(x, y)


def test_window_items_have_the_model_shapes(windows: SlideWindowDataset) -> None:
    assert len(windows) == 12
    assert all(w.side_level0_px == pytest.approx(64 * 2.0 / 0.5) for w in windows.windows)
    loader = torch.utils.data.DataLoader(windows, batch_size=4)
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2}
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0


def test_labels_follow_the_annotations_and_the_tumour_texture(windows: SlideWindowDataset) -> None:
    tissue = default_tissue(2048, 2048)
    with_tumour = 0
    tumour_green, other_green = [], []
    for index in range(len(windows)):
        image, mask = windows[index]
        labels = mask.numpy()
        assert np.array_equal(labels, windows.window_labels(index))
        x, y = _pixel_centres(windows, index)
        in_tumour = _inside(TUMOUR, x, y, -24)
        outside_tumour = ~_inside(TUMOUR, x, y, 24)
        assert (labels[in_tumour] == 2).all()
        assert (labels[outside_tumour] != 2).all()
        in_tissue = _inside(tissue[0], x, y, -48) | _inside(tissue[1], x, y, -48)
        assert (labels[in_tissue & outside_tumour] == 1).all()
        on_glass = ~(_inside(tissue[0], x, y, 48) | _inside(tissue[1], x, y, 48))
        in_box = (x >= NORMAL_BOX[0]) & (x < NORMAL_BOX[2]) & (y >= NORMAL_BOX[1]) & (y < NORMAL_BOX[3])
        assert (labels[on_glass & ~in_box] == 0).all()
        with_tumour += bool((labels == 2).any())
        green = image[1].numpy()
        tumour_green.append(green[labels == 2])
        other_green.append(green[labels == 1])
    assert with_tumour >= len(windows) // 2  # sampling favours tumour
    # Tumour texture (darker stroma, dense nuclei) is where the labels say tumour.
    assert np.concatenate(tumour_green).mean() < np.concatenate(other_green).mean() - 0.1


def test_rest_of_tissue_can_be_ignored(synthetic_slide: Path, annotations: Path) -> None:
    dataset = _dataset(synthetic_slide, annotations, rest_of_tissue="ignore", windows_per_slide=16)
    tissue = default_tissue(2048, 2048)
    seen = set()
    for index in range(len(dataset)):
        labels = dataset[index][1].numpy()
        seen |= set(np.unique(labels).tolist())
        x, y = _pixel_centres(dataset, index)
        x0, y0, x1, y1 = NORMAL_BOX
        in_box = (x >= x0 + 24) & (x < x1 - 24) & (y >= y0 + 24) & (y < y1 - 24)
        unannotated = _inside(tissue[0], x, y, -48) & ~_inside(TUMOUR, x, y, 24)
        assert (labels[unannotated] == 255).all()
        assert (labels[_inside(TUMOUR, x, y, -24)] == 2).all()
        assert (labels[in_box] == 1).all()  # an annotation of another class is non-tumour, tissue or not
    assert {2, 255} <= seen


def test_windows_are_reproducible_from_the_seed(synthetic_slide: Path, annotations: Path,
                                                windows: SlideWindowDataset) -> None:
    again = _dataset(synthetic_slide, annotations)
    assert again.windows == windows.windows
    for index in (0, 5):
        assert all(torch.equal(a, b) for a, b in zip(again[index], windows[index]))
    other = _dataset(synthetic_slide, annotations, seed=4)
    assert other.windows != windows.windows


def test_dataset_pickles_without_slide_handles_and_works_in_workers(windows: SlideWindowDataset) -> None:
    expected = windows[2]  # opens the slide in this process
    assert windows._handles
    copy = pickle.loads(pickle.dumps(windows))
    assert copy._handles == {}
    assert all(torch.equal(a, b) for a, b in zip(copy[2], expected))
    loader = torch.utils.data.DataLoader(windows, batch_size=3, num_workers=2)
    masks = torch.cat([batch[1] for batch in loader])
    assert torch.equal(masks, torch.stack([windows[i][1] for i in range(len(windows))]))
    windows.close()
    assert windows._handles == {}


def test_annotations_outside_the_slide_are_the_regions_error(synthetic_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "other-slide.geojson"
    path.write_text(json.dumps([_annotation(_box_ring(5000, 5000, 6000, 6000), "Tumor")]))
    with pytest.raises(RegionsError, match="lies outside the slide"):
        _dataset(synthetic_slide, path)


def test_bad_window_options_are_errors(synthetic_slide: Path, annotations: Path) -> None:
    with pytest.raises(InvalidParameterError, match="rest_of_tissue"):
        _dataset(synthetic_slide, annotations, rest_of_tissue="background")
    with pytest.raises(InvalidParameterError, match="windows per slide"):
        _dataset(synthetic_slide, annotations, windows_per_slide=0)
