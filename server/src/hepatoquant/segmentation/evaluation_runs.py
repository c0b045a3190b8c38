"""`hepatoquant seg eval`: a segmenter pack scored on image / mask pairs or on slides with QuPath ground truth.

Pairs are scored at the model's input size (images and masks resized as in validation). Slides are segmented
exactly as ``analyze`` does (sliding windows, stitched map) and scored at the map's resolution against the
annotations rasterised there: tumour annotations 2, other annotations 1, the rest of the detected tissue 1
(or ignored), no tissue 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hepatoquant.model_pack import ModelPack
from hepatoquant.regions import DEFAULT_TUMOUR_CLASS_NAMES, regions_from_geojson
from hepatoquant.segmentation import BACKGROUND, IGNORE_INDEX, NON_TUMOUR, SEG_CLASS_NAMES, TUMOUR
from hepatoquant.segmentation.data import PairDataset, eval_transforms, load_pair_list
from hepatoquant.segmentation.evaluate import evaluate_pairs
from hepatoquant.segmentation.inference import SlidingWindowParams, segment_slide
from hepatoquant.segmentation.model import SegmentationModel
from hepatoquant.segmentation.rasterize import rasterize_labels
from hepatoquant.slide import Slide
from hepatoquant.tissue import detect_tissue

__all__ = ["evaluate_on_pairs", "evaluate_on_slides", "slide_truth_and_prediction"]


def evaluate_on_pairs(model: SegmentationModel, pairs_json: Path, split: str, device: torch.device) -> dict:
    splits = load_pair_list(pairs_json)
    config = model.encoder.config
    dataset = PairDataset(splits[split], eval_transforms(model.input_size_px, config.mean, config.std))

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with torch.inference_mode():
            for index in range(len(dataset)):
                image, mask = dataset[index]
                predicted = model(image[None].to(device)).argmax(dim=1)[0].cpu().numpy()
                yield mask.numpy(), predicted

    return evaluate_pairs(pairs(), SEG_CLASS_NAMES)


def slide_truth_and_prediction(
    model: SegmentationModel,
    pack: ModelPack,
    slide_path: Path,
    annotations: Path,
    *,
    mpp_override_um_px: float | None = None,
    rest_of_tissue: str = "non_tumour",
    tumour_class_names: tuple[str, ...] = DEFAULT_TUMOUR_CLASS_NAMES,
    params: SlidingWindowParams = SlidingWindowParams(),
    device: torch.device = torch.device("cpu"),
) -> tuple[np.ndarray, np.ndarray]:
    """(reference, predicted) label rasters of one slide at the stitched map's resolution."""
    with Slide(slide_path, mpp_override_um_px=mpp_override_um_px) as slide:
        size, mpp = slide.dimensions, slide.mpp_um_px
        tissue = detect_tissue(slide)
    regions, _ = regions_from_geojson(annotations, size, tumour_class_names=tumour_class_names)
    segmentation = segment_slide(
        slide_path, size, mpp, tissue, model, mean=pack.mean, std=pack.std,
        window_spacing_um_px=params.spacing_um_px or pack.spacing_um_px, params=params, device=device,
    )
    height, width = segmentation.mask.shape
    downsample = segmentation.downsample
    rest = NON_TUMOUR if rest_of_tissue == "non_tumour" else IGNORE_INDEX
    shapes = [(tissue.polygons, rest)]
    shapes += [(r.geometry, NON_TUMOUR) for r in regions if r.region_class != "tumour"]
    shapes += [(r.geometry, TUMOUR) for r in regions if r.region_class == "tumour"]
    truth = rasterize_labels(shapes, (width, height), downsample, fill=BACKGROUND)
    return truth, segmentation.mask


def evaluate_on_slides(
    model: SegmentationModel, pack: ModelPack, slides: list[tuple[Path, Path, float | None]], **options
) -> dict:
    """Scores over several slides (pixels of all slides counted together)."""
    return evaluate_pairs(
        (slide_truth_and_prediction(model, pack, s, a, mpp_override_um_px=m, **options) for s, a, m in slides),
        SEG_CLASS_NAMES,
    )
