"""Tissue and pen-ink detection on a low-resolution overview (8 um/px by default), in the spirit of CLAM and WSInfer.

H&E tissue is coloured (saturated) while glass, background and most scanner artefacts are grey. Three steps:

1. **Pen ink** (blue, green, red and black markers, blobs and lines) is found first, by colour classes in HSV as
   the published deephistopath / histolab pen filters do, with hysteresis so that a stroke is followed across
   tissue: *cores* are pixels of an ink hue with high saturation (blue 190-250 deg, green 100-190 deg, red
   350-12 deg; H&E lies at 250-350 deg) or neutral and dark (black ink: dark but, unlike dense tissue, grey);
   a core grows into the connected pixels of the same kind at lower saturation (the ink's fading edges, ink
   over tissue; blue also into strongly saturated violet, blue ink over dense H&E), and strokes smaller than ``min_pen_area_um2`` (dust) are dropped. The ink is widened by
   ``pen_margin_um`` and returned as the ``"pen"`` artefact.
2. **Tissue** is saturation above a threshold computed on the pixels that are *not* ink (so strongly coloured
   ink cannot pull it up): Otsu's threshold, but never above the glass's own saturation plus
   ``faint_margin`` (so pale, thin or under-stained tissue, which Otsu puts with the glass when dense tissue is
   present, is kept), and never below ``min_saturation`` (so a blank slide's noise is not tissue). Pixels
   brighter than ``max_brightness`` in every channel are glass.
3. Morphology and area filters in physical units (um^2) remove dust and fill small holes; the ink is taken out
   of the tissue last, so tissue never includes pen.

The mask, the tissue polygons and the artefact polygons are returned; polygons are in level-0 pixel coordinates.
Library filters (histolab, TIAToolbox) were not used: neither installs against this project's pins
(histolab 0.7.0 needs numpy <= 1.24.4, Pillow < 11, scikit-image < 0.19.4; TIAToolbox 1.x needs numpy < 2.4.4,
opencv < 5, scikit-learn < 1.9, shapely <= 2.1.2, torch < 2.13). Accuracy is measured on real-texture QC slides
(``hepatoquant.qc_slides``) in ``benchmarks/tissue_qc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from shapely.geometry import MultiPolygon

from hepatoquant.errors import InvalidParameterError
from hepatoquant.geometry import pixel_edge_polygons
from hepatoquant.slide import Slide

__all__ = [
    "TissueDetectionParams",
    "TissueMask",
    "detect_tissue",
    "tissue_mask_from_rgb",
    "tissue_and_artefacts_from_rgb",
    "pen_mask_from_rgb",
]


@dataclass(frozen=True)
class TissueDetectionParams:
    """Tissue detection settings; areas in um^2, spacing in um/px.

    ``saturation_threshold`` (0-255) fixes the threshold; ``None`` lets Otsu choose it per slide on the pixels
    that are not ink, never above the glass's saturation + ``faint_margin`` (faint tissue stays tissue) and never
    below ``min_saturation`` (0-255) so that faint noise on empty glass is not tissue.

    ``detect_pen`` finds pen ink (``"pen"`` artefact, taken out of the tissue); ink strokes smaller than
    ``min_pen_area_um2`` are left alone (dust), and the ink found is widened by ``pen_margin_um``.
    """

    spacing_um_px: float = 8.0
    saturation_threshold: int | None = None
    min_saturation: int = 12
    max_brightness: int = 250  # pixels brighter than this in every channel are glass, whatever their hue
    min_object_area_um2: float = 20_000.0  # about a 140 um square: smaller specks are dust or debris
    min_hole_area_um2: float = 5_000.0  # smaller holes (vessels, fat droplets) stay tissue
    faint_margin: int = 8  # tissue threshold at most this far above the glass's saturation (0-255)
    detect_pen: bool = True
    min_pen_area_um2: float = 10_000.0  # a 100 um square: smaller dark or coloured specks are dust, not ink
    pen_margin_um: float = 0.0  # the ink's outline is widened by this much (its fading edge, mixed pixels)

    def __post_init__(self) -> None:
        if not 1.0 <= self.spacing_um_px <= 64.0:
            raise InvalidParameterError(
                f"tissue detection spacing {self.spacing_um_px} um/px is outside 1..64 um/px"
            )
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise InvalidParameterError(f"saturation threshold {self.saturation_threshold} is outside 0..255")
        if self.min_object_area_um2 < 0 or self.min_hole_area_um2 < 0:
            raise InvalidParameterError("minimum object and hole areas must be >= 0 um^2")
        if not 0 <= self.min_saturation <= 255:
            raise InvalidParameterError(f"minimum saturation {self.min_saturation} is outside 0..255")
        if not 0 <= self.faint_margin <= 255:
            raise InvalidParameterError(f"faint-tissue margin {self.faint_margin} is outside 0..255")
        if self.min_pen_area_um2 < 0:
            raise InvalidParameterError(f"minimum pen area {self.min_pen_area_um2} um^2 must be >= 0")
        if not 0 <= self.pen_margin_um <= 500:
            raise InvalidParameterError(f"pen margin {self.pen_margin_um} um is outside 0..500 um")


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask of the overview and the same tissue as polygons in level-0 pixels.

    ``downsample`` is level-0 pixels per mask pixel: mask pixel (i, j) covers level-0 x in
    [j * downsample, (j + 1) * downsample).

    ``artefacts`` maps an artefact kind (``"pen"``: ink of any colour, marker lines included) to its polygons in
    level-0 pixels, and ``artefact_masks`` to its boolean mask (same shape as ``mask``); ``mask`` and
    ``polygons`` exclude them.
    """

    mask: np.ndarray
    downsample: float
    spacing_um_px: float
    polygons: MultiPolygon
    saturation_threshold: int
    overview_rgb: np.ndarray  # the overview the mask was computed on, kept for overlays
    # Areas left out of the tissue, by kind ("pen", ...): polygons in level-0 pixels and masks like ``mask``.
    artefacts: dict[str, MultiPolygon] = field(default_factory=dict)
    artefact_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.spacing_um_px**2


def tissue_mask_from_rgb(
    rgb: np.ndarray, spacing_um_px: float, params: TissueDetectionParams
) -> tuple[np.ndarray, int]:
    """Tissue mask (bool, same height and width as ``rgb``; ink excluded) and the saturation threshold used."""
    mask, threshold, _ = tissue_and_artefacts_from_rgb(rgb, spacing_um_px, params)
    return mask, threshold


# Ink classes on OpenCV's hue scale (degrees / 2), as (hue from, hue to) inclusive. H&E (eosin pink to
# haematoxylin purple) lies at 250-350 deg, DAB brown at 15-40 deg; ink hues are outside those bands.
_INK_HUES = {
    "green": ((50, 94),),  # 100-190 deg (olive / yellowish tissue tints lie below)
    "blue": ((95, 124),),  # 190-250 deg
    "red": ((0, 6), (175, 179)),  # <= 12 deg or >= 350 deg
}
# Saturation a core pixel of each ink needs, and that its fading edge / ink over tissue still has (0-255).
_CORE_SATURATION = {"green": 60, "blue": 90, "red": 120}
_EDGE_SATURATION = {"green": 30, "blue": 30, "red": 60}  # red: pale DAB brown / eosin reaches 0-12 deg
# Blue ink over haematoxylin turns violet (250-272 deg), where H&E lies too, but H&E is never that saturated
# there (saturation < 100 at those hues on CMU-1, TCGA-CR-7395 and CRC-VAL-HE-7K): a blue stroke grows into it.
_BLUE_OVER_TISSUE = ((125, 136), 100)  # hues, saturation at least
# Black ink: dark and grey at its core (dense tissue is as dark only where strongly coloured), dark at its edge.
_BLACK_CORE = (99, 79)  # value at most, saturation at most
_BLACK_EDGE = (109, 129)  # value at most, saturation at most (a dense fold next to black ink is not ink)


def _in_hsv(hsv: np.ndarray, hues: tuple[tuple[int, int], ...], sat: tuple[int, int], val=(0, 255)) -> np.ndarray:
    """uint8 mask (0 / 255) of the pixels whose hue lies in one of ``hues`` and saturation and value in the
    given inclusive ranges (``cv2.inRange``: 10-20x faster than the same comparisons in NumPy)."""
    mask = np.zeros(hsv.shape[:2], dtype=np.uint8)
    for low, high in hues:
        mask |= cv2.inRange(hsv, (low, sat[0], val[0]), (high, sat[1], val[1]))
    return mask


def pen_mask_from_rgb(rgb: np.ndarray, spacing_um_px: float, params: TissueDetectionParams) -> np.ndarray:
    """Pen ink of any common colour (blue, green, red, black) on an overview: boolean, same height and width."""
    hsv = cv2.cvtColor(cv2.medianBlur(rgb, 3), cv2.COLOR_RGB2HSV)
    ink = np.zeros(hsv.shape[:2], dtype=bool)
    for colour, hues in _INK_HUES.items():
        core = _in_hsv(hsv, hues, (_CORE_SATURATION[colour], 255))
        edge = _in_hsv(hsv, hues, (_EDGE_SATURATION[colour], 255))
        if colour == "blue":
            edge |= _in_hsv(hsv, (_BLUE_OVER_TISSUE[0],), (_BLUE_OVER_TISSUE[1], 255))
        ink |= _grow(core, edge)
    everything = ((0, 179),)
    ink |= _grow(_in_hsv(hsv, everything, (0, _BLACK_CORE[1]), (0, _BLACK_CORE[0])),
                 _in_hsv(hsv, everything, (0, _BLACK_EDGE[1]), (0, _BLACK_EDGE[0])))
    px_area_um2 = spacing_um_px**2
    ink = _remove_small_components(ink, params.min_pen_area_um2 / px_area_um2)
    margin_px = int(round(params.pen_margin_um / spacing_um_px))
    if margin_px > 0 and ink.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1, 2 * margin_px + 1))
        ink = cv2.dilate(ink.view(np.uint8), kernel).view(bool)
    if ink.any():  # small gaps inside a stroke (tissue texture under the ink) are ink too
        ink = ~_remove_small_components(~ink, params.min_hole_area_um2 / px_area_um2)
    return ink


def _grow(core: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``extent | core`` (uint8 masks) that hold a ``core`` pixel (hysteresis)."""
    seeds = core > 0
    if not seeds.any():
        return np.zeros(core.shape, dtype=bool)
    count, labels = cv2.connectedComponents(extent | core, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[labels[seeds]] = True
    keep[0] = False
    return keep[labels]


def tissue_and_artefacts_from_rgb(
    rgb: np.ndarray, spacing_um_px: float, params: TissueDetectionParams
) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """Tissue mask (ink excluded), the saturation threshold used, and the artefact masks by kind."""
    pen = pen_mask_from_rgb(rgb, spacing_um_px, params) if params.detect_pen else np.zeros(rgb.shape[:2], bool)
    saturation = cv2.medianBlur(np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]), 5)
    bright = cv2.inRange(rgb, (params.max_brightness + 1,) * 3, (255,) * 3) > 0
    if params.saturation_threshold is not None:
        threshold = params.saturation_threshold
    else:
        considered = saturation[~pen & ~bright]
        if considered.size == 0:
            considered = saturation.ravel()
        otsu, _ = cv2.threshold(considered.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # the glass: the pixels Otsu puts below its threshold; faint tissue is anything clearly above them
        below = considered[considered <= otsu]
        glass_level = int(np.median(below)) if below.size else 0
        threshold = max(min(int(otsu), glass_level + params.faint_margin), params.min_saturation)
    mask = (saturation > threshold) & ~bright & ~pen

    # Close small gaps, then drop specks and fill holes below the area limits (in pixels of this raster).
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_area_um2 = spacing_um_px**2
    mask = _remove_small_components(mask, params.min_object_area_um2 / px_area_um2)
    mask = ~_remove_small_components(~mask, params.min_hole_area_um2 / px_area_um2)
    if pen.any():  # ink is never tissue; slivers the ink cut off are dropped like dust
        mask = _remove_small_components(mask & ~pen, params.min_object_area_um2 / px_area_um2)
    artefacts = {"pen": pen} if params.detect_pen else {}
    return mask, threshold, artefacts


def _remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area_px`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the complement of mask
    if keep[1:].all():  # nothing to remove: spare the per-pixel lookup (a third of the time on large overviews)
        return mask.copy()
    return keep[labels]


def detect_tissue(slide: Slide, params: TissueDetectionParams = TissueDetectionParams()) -> TissueMask:
    """Detect tissue on an overview of ``slide`` read at ``params.spacing_um_px`` (never at full size)."""
    spacing = max(params.spacing_um_px, slide.mpp_um_px)
    overview = slide.read_overview(spacing)
    mask, threshold, artefact_masks = tissue_and_artefacts_from_rgb(overview, spacing, params)
    # Overview pixel (i, j) covers level-0 [j * s, (j + 1) * s) with s = spacing / MPP, on both axes (its sides
    # are truncated to whole pixels, so width / overview width would overstate s and push y off the slide).
    downsample = spacing / slide.mpp_um_px
    return TissueMask(
        mask=mask,
        downsample=downsample,
        spacing_um_px=downsample * slide.mpp_um_px,
        polygons=pixel_edge_polygons(mask, downsample),  # pixel edges: the polygons' area is the mask's
        saturation_threshold=threshold,
        overview_rgb=overview,
        # Only kinds found on this slide: a report, an overlay or QuPath never lists an empty artefact.
        artefacts={kind: pixel_edge_polygons(m, downsample) for kind, m in artefact_masks.items() if m.any()},
        artefact_masks=artefact_masks,
    )
