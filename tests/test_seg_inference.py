"""Sliding-window segmentation: window layout, blending, stitching, memory, and the model's input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hepatoquant.errors import InvalidParameterError
from hepatoquant.segmentation import BACKGROUND
from hepatoquant.segmentation.inference import (
    SlidingWindowParams,
    blend_weights,
    segment_slide,
    window_grid,
)
from hepatoquant.segmentation.model import build_segmentation_model
from hepatoquant.slide import Slide
from hepatoquant.tissue import TissueMask, detect_tissue


def _tissue(mask: np.ndarray, downsample: float) -> TissueMask:
    from shapely.geometry import MultiPolygon

    return TissueMask(mask=mask, downsample=downsample, spacing_um_px=downsample * 0.5, polygons=MultiPolygon(),
                      saturation_threshold=20, overview_rgb=np.zeros(mask.shape + (3,), np.uint8))


def test_windows_cover_the_slide_and_skip_glass() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:30, 10:30] = True  # tissue only in the top-left corner (level-0 160..480 px at downsample 16)
    grid, total = window_grid((1600, 1600), 0.5, 400.0, 0.25, _tissue(mask, 16.0))
    stride = 300.0
    assert total == 5 * 5  # starts 0, 300, 600, 900, 1200 (the last flush with the edge: 1600 - 400)
    assert 0 < len(grid) < total
    assert set(np.unique(grid.x_level0_px)) <= {0.0, stride, 2 * stride}
    # Every tissue pixel is inside at least one window that runs.
    ys, xs = np.nonzero(mask)
    for x, y in zip(xs * 16 + 8, ys * 16 + 8):
        inside = (grid.x_level0_px <= x) & (x < grid.x_level0_px + 400) & (grid.y_level0_px <= y) & (y < grid.y_level0_px + 400)
        assert inside.any()


def test_last_window_is_flush_with_the_slide_edge() -> None:
    mask = np.ones((10, 10), dtype=bool)
    grid, total = window_grid((1000, 700), 0.5, 400.0, 0.25, _tissue(mask, 100.0))
    assert grid.x_level0_px.max() == 600.0 and grid.y_level0_px.max() == 300.0
    assert total == 3 * 2


def test_blend_weights_are_smooth_symmetric_and_positive() -> None:
    weights = blend_weights(56)
    assert weights.shape == (56, 56) and weights.min() > 0.009 and weights.max() <= 1.0
    np.testing.assert_allclose(weights, weights.T)
    np.testing.assert_allclose(weights, weights[::-1, ::-1])
    assert weights[28, 28] > 0.99 and weights[0, 28] < 0.2


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    model = build_segmentation_model("test_vit_micro", decoder_width=32)
    return model.eval()


def test_stitched_map_matches_the_model_on_a_single_window(synthetic_slide: Path, micro_model) -> None:
    """With one window covering an area, the map equals the model's own softmax, shrunk to the map."""
    with Slide(synthetic_slide) as slide:
        tissue = detect_tissue(slide)
        size, mpp = slide.dimensions, slide.mpp_um_px
        window = slide.read_scaled((0, 0), (2048, 2048), (32, 32))
    params = SlidingWindowParams(overlap=0.0, map_spacing_um_px=32.0, num_workers=1)
    mean, std = micro_model.encoder.config.mean, micro_model.encoder.config.std
    result = segment_slide(synthetic_slide, size, mpp, tissue, micro_model, mean=mean, std=std,
                           window_spacing_um_px=32.0, params=params)
    assert result.windows_total == 1 and result.windows_run == 1
    pixels = (torch.from_numpy(window).permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = torch.softmax(micro_model(pixels), dim=1)[0].numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-4)
    assert result.downsample == 64.0 and result.mask.shape == (32, 32)


def test_segmentation_of_a_slide_keeps_glass_as_background(synthetic_slide: Path, micro_model) -> None:
    with Slide(synthetic_slide) as slide:
        tissue = detect_tissue(slide)
        size, mpp = slide.dimensions, slide.mpp_um_px
    config = micro_model.encoder.config
    done: list[tuple[int, int]] = []
    result = segment_slide(synthetic_slide, size, mpp, tissue, micro_model, mean=config.mean, std=config.std,
                           window_spacing_um_px=2.0, progress=lambda d, t: done.append((d, t)))
    assert result.probabilities.shape == (3, 128, 128)  # 1024 um at 8 um/px
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert result.windows_run < result.windows_total  # glass-only windows were skipped
    assert done[-1] == (result.windows_run, result.windows_run)
    glass = ~tissue.mask  # same 8 um/px raster
    assert (result.mask[glass] == BACKGROUND).all()


def test_model_input_must_be_a_multiple_of_the_patch_size(micro_model) -> None:
    with pytest.raises(InvalidParameterError, match="multiple of the encoder's patch size 8"):
        micro_model(torch.zeros(1, 3, 36, 36))


def test_window_parameters_are_checked() -> None:
    with pytest.raises(InvalidParameterError, match="overlap"):
        SlidingWindowParams(overlap=0.95)
    with pytest.raises(InvalidParameterError, match="map spacing"):
        SlidingWindowParams(map_spacing_um_px=0.5)


def test_lora_targets_attention_only_and_leaves_the_backbone_frozen(micro_model) -> None:
    trainable = [n for n, p in micro_model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".attn.qkv." in n or ".attn.proj." in n for n in lora)
    assert not any("patch_embed" in n for n in lora)
    assert all(n.startswith("decoder.") for n in trainable if "lora_" not in n)
    # The base tensors recorded for the pack are the frozen backbone's, under their original names.
    assert "blocks.0.attn.qkv.weight" in micro_model.base_state_dict


def test_the_next_windows_are_launched_before_a_batch_is_blended(synthetic_slide: Path, micro_model) -> None:
    """As for tiles (hepatoquant.classify.one_behind): a GPU has the next windows queued while this thread
    blends and reads."""
    from hepatoquant.segmentation.inference import WindowSegmenter

    with Slide(synthetic_slide) as slide:
        tissue = detect_tissue(slide)
        size, mpp = slide.dimensions, slide.mpp_um_px
    config = micro_model.encoder.config
    segmenter = WindowSegmenter(micro_model, config.mean, config.std)
    events: list[str] = []

    class Recording:
        classes, input_size_px, patch_size_px = segmenter.classes, segmenter.input_size_px, segmenter.patch_size_px

        def __call__(self, windows):
            events.append("launch")
            return segmenter(windows)

    result = segment_slide(synthetic_slide, size, mpp, tissue, Recording(), mean=config.mean, std=config.std,
                           window_spacing_um_px=2.0, params=SlidingWindowParams(batch_size=4, num_workers=1),
                           progress=lambda done, total: events.append("blended"))
    batches = -(-result.windows_run // 4)
    assert batches >= 3
    assert events == ["launch"] + ["launch", "blended"] * (batches - 1) + ["blended"]
