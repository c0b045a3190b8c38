"""QC slides for tissue detection: real H&E pieces, pen ink, dust, a bubble, a fold and blur on glass.

Every pixel of tissue comes from real H&E: crops of the TCGA slide in ``../shared/testdata/slides`` (read with
OpenSlide, taken as 0.5 um/px) and mosaics of the 224 px CRC-VAL-HE-7K patches in ``../shared/testdata/patches``
(nothing is copied into the repository; the files are read when a slide is written). Pieces are cut out as
smooth blobs and composed on glass in optical density (Beer-Lambert), with a "look" each:

- ``normal``; ``pale`` / ``very_pale`` (density x 0.4 / x 0.28: faint, thin or under-stained tissue);
- ``dense_fold`` (density x 1.6, plus a band where the piece lies folded over itself: doubled density);
- ``ihc`` (the H&E unmixed with Ruifrok's vectors and recomposed as haematoxylin + DAB brown);
- ``pale_blur`` (pale, and half of it out of focus: Gaussian blur).

Pen ink is a semi-transparent coloured layer multiplying the light (``I = I_below * T_ink ** density``, density
varying along the stroke), in blue, green, red and black, as blobs and as marker / pen lines, over glass and
over tissue. Dust specks, an air bubble's outline and slide-wide glass shading are added. The ground truth
(pieces without the ink on them and without the source's own glass holes, ink per colour, dust, bubble, folds,
blurred areas) is returned as shapely geometry in level-0 pixels. The slide is a tiled pyramidal TIFF like
``hepatoquant.synthetic`` writes, at 0.5 um/px.
"""

from __future__ import annotations

import argparse
import glob
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import shapely
import tifffile
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon

from hepatoquant.geometry import mask_to_polygons, pixel_edge_polygons

__all__ = ["QCSlideSpec", "QCSlideTruth", "write_qc_slide", "INK_RGB", "default_testdata"]

MPP_UM_PX = 0.5
CELL_PX = 1792  # one piece or one artefact group per cell (896 um)
_TILE_PX = 256
_GLASS_RGB = np.array([238.0, 237.0, 241.0])
# Colour of a full-density stroke on white glass (RGB); the ink's optical density is -ln(colour / glass).
INK_RGB: dict[str, tuple[int, int, int]] = {
    "blue": (40, 70, 170),
    "green": (50, 150, 95),
    "red": (205, 45, 65),
    "black": (42, 42, 50),
}
# TCGA-CR-7395 crops (level-0 x, y; 1400 px) that are nearly all tissue.
_TCGA_BOXES = ((704, 1152), (2816, 2048), (2176, 640))
_SOURCE_PX = 1400
_PATCH_CLASSES = ("DEB", "LYM", "MUS", "NORM", "STR", "TUM", "MUC")
# Ruifrok & Johnston stain vectors (optical density, unit length): haematoxylin, eosin, DAB.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_DAB = np.array([0.27, 0.57, 0.78])
_LOOKS = ("normal", "pale", "dense_fold", "ihc", "pale_blur", "normal", "very_pale")
_LOOK_SCALE = {"normal": 1.0, "pale": 0.4, "very_pale": 0.28, "dense_fold": 1.6, "ihc": 1.0, "pale_blur": 0.4}
# Cell roles, repeated over the grid: a tissue piece, ink on glass, or the bubble and dust.
_ROLES = ("piece", "piece", "ink", "piece", "piece", "ink", "piece", "bubble", "piece", "ink", "piece", "ink")
_COLOURS = ("blue", "green", "red", "black")


def default_testdata() -> Path:
    """``../shared/testdata`` next to the project root (the team's real test data)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "testdata"


@dataclass(frozen=True)
class QCSlideSpec:
    """A grid of ``cols`` x ``rows`` cells of 1792 px (896 um) at 0.5 um/px; ``seed`` jitters the layout."""

    cols: int = 4
    rows: int = 3
    seed: int = 0
    testdata: Path = field(default_factory=default_testdata)

    @property
    def width_px(self) -> int:
        return self.cols * CELL_PX

    @property
    def height_px(self) -> int:
        return self.rows * CELL_PX


@dataclass(frozen=True)
class QCSlideTruth:
    """Ground truth in level-0 pixels. ``pieces``: name -> tissue of that piece that is not under ink and not
    glass; ``looks``: name -> look; ``ink``: colour -> ink; ``pen``: all ink; the rest are glass artefacts."""

    width_px: int
    height_px: int
    mpp_um_px: float
    pieces: dict[str, shapely.Geometry]
    looks: dict[str, str]
    ink: dict[str, shapely.Geometry]
    pen: shapely.Geometry
    dust: shapely.Geometry
    bubble: shapely.Geometry
    folds: shapely.Geometry
    blurred: shapely.Geometry

    @property
    def tissue(self) -> shapely.Geometry:
        return shapely.union_all(list(self.pieces.values()))


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, wobble: float = 0.12) -> Polygon:
    """A smooth random blob: radius(theta) = R (1 + sum of low harmonics)."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        r += rng.uniform(-wobble, wobble) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return Polygon(np.stack([cx + radius * r * np.cos(theta), cy + radius * r * np.sin(theta)], axis=1))


def _stroke(rng: np.random.Generator, start: tuple[float, float], end: tuple[float, float], width: float) -> Polygon:
    """A slightly curved marker stroke of ``width`` px from ``start`` to ``end``."""
    (x0, y0), (x1, y1) = start, end
    t = np.linspace(0, 1, 24)
    nx, ny = -(y1 - y0), x1 - x0
    norm = math.hypot(nx, ny) or 1.0
    bend = rng.uniform(-0.08, 0.08) * math.hypot(x1 - x0, y1 - y0)
    offset = bend * np.sin(np.pi * t)
    xs = x0 + (x1 - x0) * t + nx / norm * offset
    ys = y0 + (y1 - y0) * t + ny / norm * offset
    return LineString(np.stack([xs, ys], axis=1)).buffer(width / 2, quad_segs=8)


def _raster(geometry: shapely.Geometry, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Boolean raster (h, w) of ``geometry`` for the level-0 box at (x0, y0), pixel centres."""
    out = np.zeros((h, w), dtype=np.uint8)
    polygons = [geometry] if isinstance(geometry, Polygon) else list(getattr(geometry, "geoms", []))
    for polygon in polygons:
        if not isinstance(polygon, Polygon) or polygon.is_empty:
            continue
        rings = [np.asarray(polygon.exterior.coords)] + [np.asarray(r.coords) for r in polygon.interiors]
        pts = [np.round((ring - [x0 + 0.5, y0 + 0.5]) * 4).astype(np.int32) for ring in rings]
        cv2.fillPoly(out, pts[:1], 1, lineType=cv2.LINE_8, shift=2)
        if len(pts) > 1:
            cv2.fillPoly(out, pts[1:], 0, lineType=cv2.LINE_8, shift=2)
    return out.astype(bool)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale_px: float) -> np.ndarray:
    """Smooth noise in [-1, 1] with features of about ``scale_px``."""
    gh, gw = max(2, int(h / scale_px) + 2), max(2, int(w / scale_px) + 2)
    coarse = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


class _Sources:
    """Real H&E textures (optical density relative to their own glass) and their glass holes."""

    def __init__(self, testdata: Path) -> None:
        import openslide

        slide_path = testdata / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
        patch_dir = testdata / "patches" / "crc-val-he-7k"
        if not slide_path.is_file() or not patch_dir.is_dir():
            raise FileNotFoundError(
                f"QC slides are made from the team's real test data: {slide_path} and {patch_dir} are needed"
            )
        self.tcga: list[np.ndarray] = []
        with openslide.OpenSlide(str(slide_path)) as osr:
            for x, y in _TCGA_BOXES:
                rgba = np.asarray(osr.read_region((x, y), 0, (_SOURCE_PX, _SOURCE_PX)))
                self.tcga.append(np.ascontiguousarray(rgba[..., :3]))
        patches = [
            cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)
            for cls in _PATCH_CLASSES
            for f in sorted(glob.glob(str(patch_dir / cls / "*.png")))
        ]
        # Three DEB patches came out of the set's stain normalisation violet (blue at 255, green near 0): not H&E.
        self.patches = [p for p in patches if np.median(cv2.cvtColor(p, cv2.COLOR_RGB2HSV)[..., 1]) < 150]
        if not self.patches:
            raise FileNotFoundError(f"no patches in {patch_dir}")

    def mosaic(self, rng: np.random.Generator) -> np.ndarray:
        n = math.ceil(_SOURCE_PX / 224)
        order = rng.permutation(len(self.patches))
        rows = []
        for i in range(n):
            row = [np.rot90(self.patches[order[(i * n + j) % len(order)]], rng.integers(4)) for j in range(n)]
            rows.append(np.concatenate(row, axis=1))
        return np.ascontiguousarray(np.concatenate(rows, axis=0)[:_SOURCE_PX, :_SOURCE_PX])


def _od(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optical density relative to white glass (245 in every channel) and the image's own glass holes."""
    rgb = rgb.astype(np.float32)
    od = np.maximum(-np.log(np.maximum(rgb, 1.0) / 245.0), 0.0)
    hsv = cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2HSV)
    holes = ((hsv[..., 1] < 22) & (hsv[..., 2] > 205)).astype(np.uint8)
    holes = cv2.morphologyEx(holes, cv2.MORPH_OPEN, np.ones((9, 9), np.uint8))
    # only holes of at least 5,000 um^2 (20,000 px): the detector fills smaller ones
    count, labels, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= 20_000
    keep[0] = False
    return od, keep[labels]


def _look(od: np.ndarray, look: str, rng: np.random.Generator) -> np.ndarray:
    od = od * _LOOK_SCALE[look]
    if look == "ihc":
        stains = np.stack([_H, _E], axis=1)  # 3 x 2
        conc = od.reshape(-1, 3) @ np.linalg.pinv(stains).T  # n x 2
        conc = np.maximum(conc, 0)
        od = (conc[:, :1] * 0.8 * _H + conc[:, 1:] * 0.9 * _DAB).reshape(od.shape).astype(np.float32)
    return od


def _mask_to_polygons(mask: np.ndarray, x0: int, y0: int) -> shapely.Geometry:
    """``mask`` traced through its pixel centres (``geometry.mask_to_polygons``), placed at level-0 (x0, y0)."""
    return affinity.translate(mask_to_polygons(mask, 1.0), x0, y0)


def _plan(spec: QCSlideSpec, rng: np.random.Generator):
    """Pieces (name, look, source, polygon, fold band, blur half-plane) and ink strokes / blobs."""
    pieces, inks, glass_cells = [], [], []
    piece_index = 0
    for row in range(spec.rows):
        for col in range(spec.cols):
            role = _ROLES[(row * spec.cols + col) % len(_ROLES)]
            cx = (col + 0.5) * CELL_PX + rng.uniform(-60, 60)
            cy = (row + 0.5) * CELL_PX + rng.uniform(-60, 60)
            if role == "piece":
                look = _LOOKS[piece_index % len(_LOOKS)]
                source = ("tcga", piece_index % 3) if piece_index % 2 == 0 else ("mosaic", piece_index)
                shape = _blob(rng, cx, cy, rng.uniform(560, 600), wobble=0.1)
                pieces.append((f"piece{piece_index + 1}-{look}", look, source, shape))
                # ink over this piece, by turns: a blob on its edge or a marker line across it
                colour = _COLOURS[piece_index % 4]
                kind = piece_index % 3
                if kind == 0:
                    angle = rng.uniform(0, 2 * np.pi)
                    inks.append((colour, _blob(rng, cx + 560 * math.cos(angle), cy + 560 * math.sin(angle),
                                               rng.uniform(200, 260))))
                elif kind == 1:
                    angle = rng.uniform(0, np.pi)
                    dx, dy = 800 * math.cos(angle), 800 * math.sin(angle)
                    inks.append((colour, _stroke(rng, (cx - dx, cy - dy), (cx + dx, cy + dy), rng.uniform(220, 320))))
                piece_index += 1
            elif role == "ink":
                colour = _COLOURS[len(glass_cells) % 4]
                inks.append((colour, _blob(rng, cx - 300, cy - 250, rng.uniform(280, 380))))
                other = _COLOURS[(len(glass_cells) + 2) % 4]
                width = 100.0 if len(glass_cells) % 2 else rng.uniform(220, 320)  # a thin pen line, or a marker
                inks.append((other, _stroke(rng, (cx - 750, cy + 500), (cx + 750, cy + 250), width)))
                glass_cells.append(("ink", cx, cy))
            else:
                glass_cells.append(("bubble", cx, cy))
    return pieces, inks, glass_cells


def render_qc_slide(spec: QCSlideSpec = QCSlideSpec()) -> tuple[np.ndarray, QCSlideTruth]:
    """Level-0 RGB (uint8) and its ground truth."""
    rng = np.random.default_rng(spec.seed)
    sources = _Sources(spec.testdata)
    width, height = spec.width_px, spec.height_px
    # Glass: slightly uneven illumination and sensor noise.
    shade = _smooth_noise(rng, height // 64 + 1, width // 64 + 1, 40)
    shade = cv2.resize(shade, (width, height), interpolation=cv2.INTER_LINEAR)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        canvas[..., c] = np.clip(_GLASS_RGB[c] + 3.0 * shade, 0, 255).astype(np.uint8)

    pieces, inks, glass_cells = _plan(spec, rng)
    truth_pieces: dict[str, shapely.Geometry] = {}
    looks: dict[str, str] = {}
    folds, blurred = [], []
    for name, look, (kind, index), shape in pieces:
        source = sources.tcga[index] if kind == "tcga" else sources.mosaic(rng)
        if rng.integers(2):
            source = source[::-1]
        source = np.ascontiguousarray(np.rot90(source, rng.integers(4)))
        od, holes = _od(source)
        od = _look(od, look, rng)
        minx, miny = int(shape.centroid.x) - _SOURCE_PX // 2, int(shape.centroid.y) - _SOURCE_PX // 2
        inside = _raster(shape, minx, miny, _SOURCE_PX, _SOURCE_PX)
        if look == "dense_fold":
            angle = rng.uniform(0, np.pi)
            band = affinity.rotate(shapely.box(minx - 200, miny + 560, minx + _SOURCE_PX + 200, miny + 820),
                                   angle, origin=shape.centroid, use_radians=True).intersection(shape)
            folds.append(band)
            in_band = _raster(band, minx, miny, _SOURCE_PX, _SOURCE_PX)
            shift = np.roll(od, 260, axis=0)  # the folded-over layer: tissue from next to the band
            od = np.where(in_band[..., None], od + shift, od)
        if look == "pale_blur":
            half = shapely.box(minx, miny, minx + _SOURCE_PX // 2, miny + _SOURCE_PX).intersection(shape)
            blurred.append(half)
            blur = cv2.GaussianBlur(od, (0, 0), 6)
            od = np.where(_raster(half, minx, miny, _SOURCE_PX, _SOURCE_PX)[..., None], blur, od)
        alpha = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 1.5)[..., None]
        x0, y0, x1, y1 = max(minx, 0), max(miny, 0), min(minx + _SOURCE_PX, width), min(miny + _SOURCE_PX, height)
        sx, sy = x0 - minx, y0 - miny
        region = canvas[y0:y1, x0:x1].astype(np.float32)
        transmit = np.exp(-od[sy : sy + y1 - y0, sx : sx + x1 - x0] * alpha[sy : sy + y1 - y0, sx : sx + x1 - x0])
        canvas[y0:y1, x0:x1] = np.clip(region * transmit, 0, 255).astype(np.uint8)
        truth = shape.difference(_mask_to_polygons(holes & inside, minx, miny))
        truth_pieces[name] = truth
        looks[name] = look

    # Dust: small grey-brown specks, on glass and on tissue; the bubble: a dark ring with a bright rim.
    dust = []
    for _ in range(max(1, spec.cols * spec.rows * 6)):
        x, y = rng.uniform(100, width - 100), rng.uniform(100, height - 100)
        r = rng.uniform(6, 40) if rng.random() < 0.8 else rng.uniform(40, 70)
        speck = _blob(rng, x, y, r, wobble=0.3)
        dust.append(speck)
        x0, y0, w, h = int(x - 2 * r), int(y - 2 * r), int(4 * r), int(4 * r)
        x0, y0 = max(x0, 0), max(y0, 0)
        m = cv2.GaussianBlur(_raster(speck, x0, y0, w, h).astype(np.float32), (0, 0), 1.0)[..., None]
        patch = canvas[y0 : y0 + h, x0 : x0 + w]
        m = m[: patch.shape[0], : patch.shape[1]]
        canvas[y0 : y0 + h, x0 : x0 + w] = (patch * (1 - 0.6 * m) + np.array([95, 88, 80]) * 0.6 * m).astype(np.uint8)
    bubbles = []
    for role, cx, cy in glass_cells:
        if role != "bubble":
            continue
        circle = Point(cx + 350, cy).buffer(900, quad_segs=64)  # reaches into the piece on its left
        ring = circle.difference(Point(cx + 350, cy).buffer(888, quad_segs=64))
        bubbles.append(ring)
        x0, y0 = max(int(cx + 350 - 920), 0), max(int(cy - 920), 0)
        x1, y1 = min(int(cx + 350 + 920), width), min(int(cy + 920), height)
        m = _raster(ring, x0, y0, x1 - x0, y1 - y0).astype(np.float32)
        rim = _raster(Point(cx + 350, cy).buffer(888).difference(Point(cx + 350, cy).buffer(880)), x0, y0, x1 - x0, y1 - y0)
        m = cv2.GaussianBlur(m, (0, 0), 1.2)[..., None]
        patch = canvas[y0:y1, x0:x1].astype(np.float32)
        patch = patch * (1 - 0.7 * m) + 80.0 * 0.7 * m
        patch[rim] = np.minimum(patch[rim] * 1.04 + 6, 255)
        canvas[y0:y1, x0:x1] = patch.astype(np.uint8)

    # Ink last: over glass, tissue and dust alike.
    ink_by_colour: dict[str, list[shapely.Geometry]] = {c: [] for c in _COLOURS}
    for colour, geometry in inks:
        geometry = geometry.intersection(shapely.box(0, 0, width, height))
        if geometry.is_empty:
            continue
        ink_by_colour[colour].append(geometry)
        od_ink = -np.log(np.array(INK_RGB[colour], dtype=np.float32) / _GLASS_RGB.astype(np.float32))
        minx, miny, maxx, maxy = (int(v) for v in geometry.bounds)
        x0, y0, x1, y1 = max(minx - 4, 0), max(miny - 4, 0), min(maxx + 5, width), min(maxy + 5, height)
        m = cv2.GaussianBlur(_raster(geometry, x0, y0, x1 - x0, y1 - y0).astype(np.float32), (0, 0), 1.5)
        density = rng.uniform(0.75, 1.05) * (1 + 0.2 * _smooth_noise(rng, y1 - y0, x1 - x0, 120))
        patch = canvas[y0:y1, x0:x1].astype(np.float32)
        transmit = np.exp(-(m * density)[..., None] * od_ink)
        canvas[y0:y1, x0:x1] = np.clip(patch * transmit, 0, 255).astype(np.uint8)

    # Sensor noise.
    noise = rng.integers(-2, 3, size=(height, 1, 1), dtype=np.int16)  # cheap row noise
    canvas = np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    ink = {c: shapely.union_all(g) if g else Polygon() for c, g in ink_by_colour.items()}
    pen = shapely.union_all(list(ink.values()))
    truth = QCSlideTruth(
        width_px=width,
        height_px=height,
        mpp_um_px=MPP_UM_PX,
        pieces={name: shapely.make_valid(g.difference(pen)) for name, g in truth_pieces.items()},
        looks=looks,
        ink=ink,
        pen=pen,
        dust=shapely.union_all(dust),
        bubble=shapely.union_all(bubbles) if bubbles else Polygon(),
        folds=shapely.union_all(folds) if folds else Polygon(),
        blurred=shapely.union_all(blurred) if blurred else Polygon(),
    )
    return canvas, truth


def write_pyramid(path: str | Path, level0: np.ndarray, mpp_um_px: float = MPP_UM_PX) -> Path:
    """Write ``level0`` as a tiled, pyramidal (downsamples 1, 4, 16, ...) TIFF with MPP in its resolution tags."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    level, downsample = level0, 1
    with tifffile.TiffWriter(path, bigtiff=level0.size > 2**31) as writer:
        while True:
            pixels_per_cm = 1e4 / (mpp_um_px * downsample)
            writer.write(
                level,
                tile=(_TILE_PX, _TILE_PX),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=0 if downsample == 1 else 1,
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
            )
            h, w = level.shape[:2]
            if max(w, h) <= 1024:
                break
            level = cv2.resize(level, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
            downsample *= 4
    return path


def write_qc_slide(path: str | Path, spec: QCSlideSpec = QCSlideSpec()) -> QCSlideTruth:
    """Write the QC slide of ``spec`` as a pyramidal TIFF at 0.5 um/px and return its ground truth."""
    level0, truth = render_qc_slide(spec)
    write_pyramid(path, level0)
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tissue-detection QC slide (real H&E + pen + artefacts)")
    parser.add_argument("path", type=Path)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    truth = write_qc_slide(args.path, QCSlideSpec(cols=args.cols, rows=args.rows, seed=args.seed))
    print(args.path, truth.width_px, truth.height_px, len(truth.pieces), "pieces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


@dataclass(frozen=True)
class QCScore:
    """How a tissue detection did on a QC slide, with tiles as the analysis makes them (>= half tissue, centre
    inside the tissue outline, none touching a detected artefact). ``recall``: per piece, area of the tiles whose
    centre lies in it / its area. ``perfect_recall``: the same for a perfect tissue mask at the detector's
    resolution with the true ink as the artefact: tiles are whole and tiles touching ink are left out, so even
    a perfect detector stays under 1 on pieces that carry ink or have ragged edges."""

    tiles: int
    recall: dict[str, float]
    perfect_recall: dict[str, float]
    tiles_on_pen: int  # centre on true ink
    tiles_touching_pen: int  # more than 1 % of the tile on true ink
    tiles_on_glass: int  # centre in no piece (ink, dust, bubble or bare glass)
    tiles_mostly_glass: int  # under a quarter of the tile on true tissue (the rest of tiles_on_glass: edge tiles)
    pen_covered: float  # share of the ink's area inside the detected pen artefacts (nan without them)
    pen_on_tissue_um2: float  # detected pen outside the true ink (8 um margin), on true tissue

    def relative_recall(self) -> dict[str, float]:
        """Recall against what a perfect detector gets."""
        return {k: v / self.perfect_recall[k] if self.perfect_recall[k] else 0.0 for k, v in self.recall.items()}

    def summary(self) -> dict:
        return {
            "tiles": self.tiles,
            "min_recall": round(min(self.recall.values()), 3),
            "recall": {k: round(v, 3) for k, v in self.recall.items()},
            "perfect_recall": {k: round(v, 3) for k, v in self.perfect_recall.items()},
            "min_relative_recall": round(min(self.relative_recall().values()), 3),
            "tiles_on_pen": self.tiles_on_pen,
            "tiles_touching_pen": self.tiles_touching_pen,
            "tiles_on_glass": self.tiles_on_glass,
            "tiles_mostly_glass": self.tiles_mostly_glass,
            "pen_covered": round(self.pen_covered, 3),
            "pen_on_tissue_mm2": round(self.pen_on_tissue_um2 / 1e6, 4),
        }


def score_detection(truth: QCSlideTruth, tissue) -> QCScore:
    """Score a ``TissueMask`` (new or old detector) against the ground truth."""
    from hepatoquant.tiling import TileSpec, build_tile_grid, without_artefacts
    from hepatoquant.tissue import TissueMask

    def tiles(mask, artefacts):
        grid = build_tile_grid((truth.width_px, truth.height_px), truth.mpp_um_px, mask, TileSpec(), mask.polygons)
        grid, _ = without_artefacts(grid, artefacts)
        return grid, grid.x_level0_px + grid.size_level0_px / 2, grid.y_level0_px + grid.size_level0_px / 2

    def recall_of(cx, cy, tile_area):
        return {n: float(shapely.contains_xy(g, cx, cy).sum() * tile_area / g.area) for n, g in truth.pieces.items()}

    grid, cx, cy = tiles(tissue, getattr(tissue, "artefacts", {}))
    tile_area = grid.size_level0_px**2
    recall = recall_of(cx, cy, tile_area)
    ds = tissue.downsample
    rows, cols = tissue.mask.shape
    px, py = np.meshgrid((np.arange(cols) + 0.5) * ds, (np.arange(rows) + 0.5) * ds)
    perfect = shapely.contains_xy(truth.tissue, px, py)
    oracle = TissueMask(perfect, ds, tissue.spacing_um_px, pixel_edge_polygons(perfect, ds), 0, tissue.overview_rgb)
    _, ox, oy = tiles(oracle, {"pen": truth.pen})
    in_piece = shapely.contains_xy(truth.tissue, cx, cy)
    shapely.prepare(truth.pen)
    boxes = grid.boxes()
    on_ink = shapely.area(shapely.intersection(truth.pen, boxes)) / tile_area
    on_tissue = shapely.area(shapely.intersection(truth.tissue, boxes)) / tile_area
    pen = getattr(tissue, "artefacts", {}).get("pen")
    if pen is None:
        covered, false_um2 = float("nan"), 0.0
    else:
        covered = shapely.intersection(pen, truth.pen).area / truth.pen.area
        false_px = shapely.intersection(shapely.difference(pen, truth.pen.buffer(16)), truth.tissue).area
        false_um2 = false_px * truth.mpp_um_px**2
    return QCScore(
        tiles=len(grid),
        recall=recall,
        perfect_recall=recall_of(ox, oy, tile_area),
        tiles_on_pen=int(shapely.contains_xy(truth.pen, cx, cy).sum()),
        tiles_touching_pen=int((on_ink > 0.01).sum()),
        tiles_on_glass=int((~in_piece).sum()),
        tiles_mostly_glass=int((on_tissue < 0.25).sum()),
        pen_covered=covered,
        pen_on_tissue_um2=false_um2,
    )
