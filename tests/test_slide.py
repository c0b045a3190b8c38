"""Tests of ``hepatoquant.slide``: metadata, MPP, level choice and pixel reads on real SVS files and on
generated pyramidal TIFFs, compared against reference readers; and the errors bad inputs raise."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from hepatoquant.errors import (
    CorruptSlideError,
    HepatoQuantError,
    InvalidParameterError,
    MissingMPPError,
    SlideNotFoundError,
    UnsupportedSlideError,
)
from hepatoquant.slide import Slide, SlideInfo, validate_mpp
from hepatoquant.synthetic import SyntheticSlideSpec, write_synthetic_slide


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _area_resize(pixels: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(pixels, out_size, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small single-level synthetic TIFFs: one at 0.25 um/px, one without any MPP."""
    folder = tmp_path_factory.mktemp("small-slides")
    specs = {
        "mpp025": SyntheticSlideSpec(width_px=640, height_px=384, mpp_um_px=0.25),
        "no_mpp": SyntheticSlideSpec(width_px=512, height_px=512, mpp_um_px=None),
    }
    return {name: write_synthetic_slide(folder / f"{name}.tiff", spec) for name, spec in specs.items()}


# -- real slides: metadata ------------------------------------------------------------------------------
def test_cmu_metadata(cmu_slide: Path) -> None:
    with Slide(cmu_slide) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.level_dimensions == ((2220, 2967),)
        assert slide.level_downsamples == (1.0,)
        assert slide.vendor == "aperio"
        assert slide.mpp_um_px == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"
        assert {"label", "thumbnail", "macro"} <= set(slide.associated_image_names)
        info = slide.info()
    assert isinstance(info, SlideInfo)
    assert (info.width_px, info.height_px, info.level_count) == (2220, 2967, 1)
    assert info.mpp_um_px == pytest.approx(0.499)
    assert info.mpp_source == "metadata"
    assert info.objective_power == 20.0
    assert info.vendor == "aperio"
    assert info.path == str(cmu_slide)
    assert info.file_size_bytes == cmu_slide.stat().st_size


def test_tcga_metadata(tcga_slide: Path) -> None:
    with Slide(tcga_slide) as slide:
        assert slide.dimensions == (4443, 3567)
        assert len(slide.level_dimensions) == 2
        assert slide.level_dimensions[1] == (2221, 1783)
        assert slide.level_downsamples[0] == 1.0
        assert slide.level_downsamples[1] == pytest.approx(2.0005, abs=1e-3)
        assert slide.vendor == "aperio"


def test_tcga_without_mpp_raises_naming_slide_and_option(tcga_slide: Path) -> None:
    with Slide(tcga_slide) as slide:
        with pytest.raises(MissingMPPError) as excinfo:
            _ = slide.mpp_um_px
        message = str(excinfo.value)
        assert str(tcga_slide) in message
        assert "--mpp" in message
        # info() needs the MPP too, and fails the same way instead of guessing.
        with pytest.raises(MissingMPPError):
            slide.info()
        # overview reads are in physical units: they need the MPP as well.
        with pytest.raises(MissingMPPError):
            slide.read_overview(8.0)
    assert issubclass(MissingMPPError, ValueError)
    assert issubclass(MissingMPPError, HepatoQuantError)


def test_mpp_override_on_slide_without_mpp(tcga_slide: Path) -> None:
    with Slide(tcga_slide, mpp_override_um_px=0.5) as slide:
        assert slide.mpp_um_px == 0.5
        assert slide.mpp_source == "override"
        info = slide.info()
    assert info.mpp_um_px == 0.5
    assert info.mpp_source == "override"
    assert info.objective_power is None


def test_mpp_override_wins_over_metadata(cmu_slide: Path) -> None:
    with Slide(cmu_slide, mpp_override_um_px=0.25) as slide:
        assert slide.mpp_um_px == 0.25
        assert slide.mpp_source == "override"
        assert slide.info().mpp_um_px == 0.25


@pytest.mark.parametrize("bad", [0.0, -0.5, 0.01, 25.0, 1e6, math.nan, math.inf, -math.inf])
def test_implausible_mpp_override_is_rejected(cmu_slide: Path, bad: float) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        Slide(cmu_slide, mpp_override_um_px=bad)
    assert "--mpp" in str(excinfo.value)
    assert "um/px" in str(excinfo.value)


@pytest.mark.parametrize("good", [0.05, 0.25, 0.5, 20.0])
def test_validate_mpp_accepts_range_ends(good: float) -> None:
    assert validate_mpp(good, what="x") == good


# -- generated slides: metadata ---------------------------------------------------------------------------
def test_synthetic_pyramid_metadata(synthetic_slide: Path) -> None:
    with Slide(synthetic_slide) as slide:
        assert slide.dimensions == (2048, 2048)
        assert slide.level_dimensions == ((2048, 2048), (512, 512))
        assert slide.level_downsamples == (1.0, 4.0)
        assert slide.vendor == "generic-tiff"
        assert slide.mpp_um_px == pytest.approx(0.5)
        assert slide.mpp_source == "metadata"


def test_synthetic_mpp_from_resolution_tags(small_slides: dict[str, Path]) -> None:
    with Slide(small_slides["mpp025"]) as slide:
        assert slide.dimensions == (640, 384)
        assert slide.mpp_um_px == pytest.approx(0.25)
        assert slide.info().mpp_source == "metadata"


def test_synthetic_without_mpp(small_slides: dict[str, Path]) -> None:
    path = small_slides["no_mpp"]
    with Slide(path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        with pytest.raises(MissingMPPError) as excinfo:
            _ = slide.mpp_um_px
        assert str(path) in str(excinfo.value)
    with Slide(path, mpp_override_um_px=0.3) as slide:
        assert slide.mpp_um_px == 0.3


# -- level choice -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("downsample", "level"),
    [(0.5, 0), (1.0, 0), (3.0, 0), (3.9, 0), (4.0, 1), (4.03, 1), (5.0, 1), (16.0, 1), (1000.0, 1)],
)
def test_best_level_synthetic(synthetic_slide: Path, downsample: float, level: int) -> None:
    with Slide(synthetic_slide) as slide:
        assert slide.best_level(downsample) == level


@pytest.mark.parametrize(
    ("downsample", "level"),
    [(0.25, 0), (1.0, 0), (1.5, 0), (1.95, 0), (2.0, 1), (2.0005, 1), (3.0, 1), (64.0, 1)],
)
def test_best_level_tcga_tolerates_near_integer_downsample(tcga_slide: Path, downsample: float, level: int) -> None:
    """TCGA's level 1 is 2.0005x: asking for exactly 2x must still use it, not fall back to level 0."""
    with Slide(tcga_slide) as slide:
        assert slide.best_level(downsample) == level


def test_best_level_cmu_single_level(cmu_slide: Path) -> None:
    with Slide(cmu_slide) as slide:
        assert [slide.best_level(d) for d in (0.5, 1.0, 2.0, 32.0)] == [0, 0, 0, 0]


# -- pixels against reference readers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_levels(synthetic_slide: Path) -> list[np.ndarray]:
    """The synthetic slide's pyramid levels decoded by tifffile (lossless zlib: an exact reference)."""
    with tifffile.TiffFile(synthetic_slide) as tif:
        return [page.asarray() for page in tif.pages]


def test_read_region_matches_tifffile(synthetic_slide: Path, synthetic_levels: list[np.ndarray]) -> None:
    with Slide(synthetic_slide) as slide:
        level0 = slide.read_region((300, 700), 0, (400, 250))
        level1 = slide.read_region((1000, 400), 1, (160, 100))
    assert level0.dtype == np.uint8 and level0.shape == (250, 400, 3)
    np.testing.assert_array_equal(level0, synthetic_levels[0][700:950, 300:700])
    # location is level 0 even when reading level 1: (1000, 400) / 4 = (250, 100)
    np.testing.assert_array_equal(level1, synthetic_levels[1][100:200, 250:410])


@pytest.mark.parametrize("downsample", [1.0, 2.0, 3.0, 4.0, 8.0, 16.0])
def test_read_scaled_matches_reference_levels_synthetic(
    synthetic_slide: Path, synthetic_levels: list[np.ndarray], downsample: float
) -> None:
    """read_scaled reads the best level and area-resizes: compare with the same done on tifffile's levels."""
    x, y, side = 256, 512, 1024
    out = int(side / downsample)
    with Slide(synthetic_slide) as slide:
        got = slide.read_scaled((x, y), (side, side), (out, out))
    assert got.shape == (out, out, 3) and got.dtype == np.uint8
    level = 1 if downsample >= 4 else 0
    level_ds = 4 if level else 1
    crop = synthetic_levels[level][y // level_ds : (y + side) // level_ds, x // level_ds : (x + side) // level_ds]
    reference = crop if crop.shape[0] == out else _area_resize(crop, (out, out))
    assert _mean_abs_diff(got, reference) < 0.5
    # And against level 0 downscaled: the generated level 1 is point-sampled, so only close, not equal.
    from_level0 = _area_resize(synthetic_levels[0][y : y + side, x : x + side], (out, out))
    assert _mean_abs_diff(got, from_level0) < 12.0


@pytest.mark.parametrize("downsample", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_read_scaled_matches_level0_area_resize_tcga(tcga_slide: Path, downsample: float) -> None:
    """On a real two-level slide (level 1 at 2.0005x, JPEG 2000): close to level 0 + INTER_AREA at every scale."""
    x, y, side = 1500, 1200, 1200
    out = int(round(side / downsample))
    with Slide(tcga_slide) as slide:
        reference = slide.read_region((x, y), 0, (side, side))
        if out != side:
            reference = _area_resize(reference, (out, out))
        got = slide.read_scaled((x, y), (side, side), (out, out))
    assert got.shape == (out, out, 3)
    if downsample == 1.0:
        np.testing.assert_array_equal(got, reference)
    else:
        # The scanner's level 1 is its own JPEG 2000 encoding of a filtered image, so about 7 grey levels
        # apart even when aligned; a shift of one output pixel costs twice that (measured: 14 to 27).
        assert _mean_abs_diff(got, reference) < 10.0
        assert np.abs(got.mean(axis=(0, 1)) - reference.mean(axis=(0, 1))).max() < 1.5


def test_read_scaled_uses_the_best_level(tcga_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Slide(tcga_slide) as slide:
        levels: list[int] = []
        real_read_region = slide.read_region

        def spy(location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
            levels.append(level)
            return real_read_region(location, level, size)

        monkeypatch.setattr(slide, "read_region", spy)
        slide.read_scaled((0, 0), (300, 300), (300, 300))
        slide.read_scaled((0, 0), (300, 300), (150, 150))  # 2x: level 1 (2.0005x) despite the 0.05% excess
        slide.read_scaled((0, 0), (300, 300), (100, 100))
        slide.read_scaled((0, 0), (300, 300), (200, 200))  # 1.5x: level 1 would be too coarse
    assert levels == [0, 1, 1, 0]


@pytest.mark.parametrize("downsample", [1.0, 2.5, 7.0])
def test_read_scaled_cmu_against_level0(cmu_slide: Path, downsample: float) -> None:
    x, y, side = 400, 900, 700
    out = int(round(side / downsample))
    with Slide(cmu_slide) as slide:
        level0 = slide.read_region((x, y), 0, (side, side))
        got = slide.read_scaled((x, y), (side, side), (out, out))
    reference = level0 if out == side else _area_resize(level0, (out, out))
    assert _mean_abs_diff(got, reference) < 0.5


def test_read_scaled_upsamples(synthetic_slide: Path) -> None:
    with Slide(synthetic_slide) as slide:
        got = slide.read_scaled((800, 800), (50, 50), (100, 100))
        base = slide.read_region((800, 800), 0, (50, 50))
    assert got.shape == (100, 100, 3)
    assert _mean_abs_diff(_area_resize(got, (50, 50)), base) < 6.0


def test_read_scaled_non_square_output(synthetic_slide: Path, synthetic_levels: list[np.ndarray]) -> None:
    with Slide(synthetic_slide) as slide:
        got = slide.read_scaled((100, 200), (800, 400), (200, 100))
    assert got.shape == (100, 200, 3)
    reference = synthetic_levels[1][50:150, 25:225]
    assert _mean_abs_diff(got, reference) < 0.5


def test_transparent_area_is_white(synthetic_slide: Path) -> None:
    """Outside the scanned area OpenSlide returns transparent pixels: they must look like white glass."""
    with Slide(synthetic_slide) as slide:
        corner = slide.read_region((-64, -32), 0, (128, 96))
        edge = slide.read_scaled((1984, 1984), (128, 128), (32, 32))
    assert corner.shape == (96, 128, 3)
    assert (corner[:32, :] == 255).all() and (corner[:, :64] == 255).all()
    inside = corner[32:, 64:]
    assert (inside < 255).any(axis=-1).mean() > 0.9  # glass (~243) plus noise, not white
    assert (edge[16:, :] == 255).all() and (edge[:, 16:] == 255).all()
    assert (edge[:16, :16] < 255).any(axis=-1).mean() > 0.9


# -- overview --------------------------------------------------------------------------------------------
def test_read_overview_synthetic(synthetic_slide: Path, synthetic_levels: list[np.ndarray]) -> None:
    with Slide(synthetic_slide) as slide:
        overview = slide.read_overview(8.0)  # 16 level-0 px per output px
        with pytest.raises(InvalidParameterError):
            slide.read_overview(0.25)
    assert overview.shape == (128, 128, 3) and overview.dtype == np.uint8
    reference = _area_resize(synthetic_levels[1], (128, 128))
    assert _mean_abs_diff(overview, reference) < 0.5


def test_read_overview_cmu_block_by_block_matches_one_read(cmu_slide: Path) -> None:
    """At 0.6 um/px the overview is read in several blocks; the stitched result equals one big resize."""
    with Slide(cmu_slide) as slide:
        scale = 0.6 / slide.mpp_um_px
        overview = slide.read_overview(0.6)
        out_w, out_h = int(2220 / scale), int(2967 / scale)
        whole = slide.read_region((0, 0), 0, (int(round(out_w * scale)), int(round(out_h * scale))))
    assert overview.shape == (out_h, out_w, 3)
    assert out_w > 1024 and out_h > 2048  # really more than one block of at most 2048 px read
    reference = _area_resize(whole, (out_w, out_h))
    assert _mean_abs_diff(overview, reference) < 3.0
    # no seams: every row and column is image, not left uninitialised
    assert _mean_abs_diff(overview[1700:1710], reference[1700:1710]) < 6.0
    assert _mean_abs_diff(overview[:, 1700:1710], reference[:, 1700:1710]) < 6.0


def test_read_overview_tcga_with_override(tcga_slide: Path) -> None:
    with Slide(tcga_slide, mpp_override_um_px=0.5) as slide:
        overview = slide.read_overview(8.0)  # 16 level-0 px per output px, read from level 1 (2.0005x)
        level1 = slide.read_region((0, 0), 1, slide.level_dimensions[1])
    out_h, out_w = int(3567 / 16), int(4443 / 16)
    assert overview.shape == (out_h, out_w, 3)
    covered = level1[: int(round(out_h * 16 / 2.0005)), : int(round(out_w * 16 / 2.0005))]
    reference = _area_resize(covered, (out_w, out_h))
    assert _mean_abs_diff(overview, reference) < 3.0


# -- bad inputs ------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "slide.svs"
    with pytest.raises(SlideNotFoundError) as excinfo:
        Slide(path)
    assert isinstance(excinfo.value, FileNotFoundError)
    assert isinstance(excinfo.value, HepatoQuantError)
    assert str(path) in str(excinfo.value)
    # catchable as the builtin, too
    with pytest.raises(FileNotFoundError):
        Slide(str(path))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as excinfo:
        Slide(tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    assert "directory" in str(excinfo.value)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 20)
    with pytest.raises(UnsupportedSlideError) as excinfo:
        Slide(path)
    assert isinstance(excinfo.value, ValueError)
    assert str(path) in str(excinfo.value)


def test_plain_stripped_tiff(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((300, 400, 3), 200, np.uint8), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        assert not tif.pages[0].is_tiled  # the premise: a strip-organised TIFF
    with pytest.raises(UnsupportedSlideError) as excinfo:
        Slide(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "tiled" in message  # says what to convert it to


def test_fake_dicom(tmp_path: Path) -> None:
    path = tmp_path / "slide.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    with pytest.raises(UnsupportedSlideError) as excinfo:
        Slide(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_svs(tmp_path: Path, cmu_slide: Path, fraction: float) -> None:
    """An Aperio SVS keeps its directories after the tile data, so a truncated copy loses them: OpenSlide
    reports it as an unsupported format (OpenSlideUnsupportedFormatError), never opening it."""
    data = cmu_slide.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(UnsupportedSlideError) as excinfo:
        Slide(path)
    assert isinstance(excinfo.value.__cause__, openslide.OpenSlideUnsupportedFormatError)
    assert str(path) in str(excinfo.value)


def test_truncated_tiff_tail_is_corrupt(tmp_path: Path, synthetic_slide: Path) -> None:
    """A generated TIFF keeps directories before the data: cutting its last bytes leaves valid directories
    pointing at missing tile data, which OpenSlide reports as an error: CorruptSlideError."""
    data = synthetic_slide.read_bytes()
    path = tmp_path / "truncated.tiff"
    path.write_bytes(data[:-1000])
    with pytest.raises(CorruptSlideError) as excinfo:
        Slide(path)
    assert isinstance(excinfo.value, OSError)
    assert str(path) in str(excinfo.value)


def test_damaged_tiles_fail_at_read_time(damaged_cmu_slide: Path) -> None:
    """Tile data overwritten (directories intact): the slide opens, reading its pixels raises CorruptSlideError."""
    path = damaged_cmu_slide
    with Slide(path) as slide:
        assert slide.dimensions == (2220, 2967)
        with pytest.raises(CorruptSlideError) as excinfo:
            slide.read_region((0, 0), 0, (2220, 2967))
        assert str(path) in str(excinfo.value)
        # OpenSlide refuses every call on a handle after an error: later reads must still be our error.
        with pytest.raises(CorruptSlideError) as excinfo:
            slide.read_scaled((0, 0), (2220, 2967), (200, 200))
        assert str(path) in str(excinfo.value)
        with pytest.raises(CorruptSlideError):
            slide.read_region((0, 0), 0, (16, 16))


def test_copy_of_real_slide_still_opens(tmp_path: Path, cmu_slide: Path) -> None:
    """Control for the truncation tests: an intact copy in the same place opens and reads."""
    path = tmp_path / "copy.svs"
    shutil.copyfile(cmu_slide, path)
    with Slide(path) as slide:
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def _boxes_one_by_one(slide: Slide, xs, ys, size: float, out_px: int) -> list[np.ndarray]:
    return [slide.read_scaled((x, y), (size, size), (out_px, out_px)) for x, y in zip(xs, ys)]


@pytest.mark.parametrize(
    ("slide_name", "size", "out_px", "step", "reads"),
    [
        ("cmu_slide", 150.3, 150, 150.3, 5),  # tiles at level 0, side by side (0.5 um/px tiles, 0.499 um/px slide)
        ("cmu_slide", 301.0, 150, 301.0, 5),  # 40x-like: level 0 read and shrunk
        ("cmu_slide", 896.0, 224, 672.0, 5),  # segmentation windows overlapping by a quarter
        ("tcga_slide", 300.0, 150, 300.0, 9),  # level 1 at 2.0005x: offsets never whole level pixels: one by one
        ("synthetic_slide", 512.0, 128, 384.0, 5),  # exact 4x level: runs at level 1
    ],
)
def test_boxes_read_in_runs_are_the_boxes_read_one_by_one(request, monkeypatch: pytest.MonkeyPatch, slide_name: str,
                                                          size: float, out_px: int, step: float, reads: int) -> None:
    """Runs along a row (with gaps, several rows, a last box flush elsewhere) give exactly read_scaled's pixels,
    with fewer OpenSlide calls where the level allows."""
    path = request.getfixturevalue(slide_name)
    with Slide(path) as slide:
        columns = [c for c in range(5) if c != 3]  # a gap: the run breaks there
        xs = np.array([100 + c * step for _ in range(2) for c in columns] + [1000.0])
        ys = np.array([200 + r * step for r in range(2) for _ in columns] + [37.0])
        expected = _boxes_one_by_one(slide, xs, ys, size, out_px)
        calls: list[tuple] = []
        real = slide.read_region
        monkeypatch.setattr(slide, "read_region", lambda *args: (calls.append(args), real(*args))[1])
        got = list(slide.read_scaled_boxes(xs, ys, size, out_px))
    assert len(got) == len(expected) == len(xs)
    for box, reference in zip(got, expected):
        np.testing.assert_array_equal(box, reference)
    assert len(calls) == reads  # in runs: per row columns 0-2 together, column 4 alone, then the last box
