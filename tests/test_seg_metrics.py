"""Tests of segmentation metrics, polygon rasterisation and evaluation files: hand-computed scores on tiny
masks, agreement with scikit-learn, exact pixel-centre rasterisation (holes, overlaps, clipping, downsample),
and atomic writing of the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import sklearn.metrics
from shapely.geometry import MultiPolygon, Point, Polygon, box

from hepatoquant.errors import InvalidParameterError, OutputWriteError
from hepatoquant.segmentation import IGNORE_INDEX, SEG_CLASS_NAMES
from hepatoquant.segmentation.evaluate import evaluate_pairs, write_evaluation
from hepatoquant.segmentation.metrics import confusion_matrix, scores_markdown, segmentation_scores
from hepatoquant.segmentation.rasterize import rasterize_labels

# Reference and prediction used for hand-computed scores (classes 0, 1, 2; one ignored pixel).
TRUTH = np.array([[0, 0, 1, 1], [1, 1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [1, 2, 2, 0]], dtype=np.uint8)
# Counted pixels (truth, pred): (0,0) (0,1) (1,1) (1,1) (1,1) (1,2) (2,2)
HAND_CONFUSION = np.array([[1, 1, 0], [0, 3, 1], [0, 0, 1]])


def centre_sampled(geometry: shapely.Geometry, width: int, height: int, downsample: float) -> np.ndarray:
    """Brute-force reference: pixels whose level-0 centre lies in (or on) the geometry."""
    x, y = np.meshgrid((np.arange(width) + 0.5) * downsample, (np.arange(height) + 0.5) * downsample)
    return shapely.intersects_xy(geometry, x, y)


# --- confusion matrix ------------------------------------------------------------------------------------------


def test_confusion_matrix_hand_computed_and_ignores_ignore_pixels() -> None:
    matrix = confusion_matrix(TRUTH, PRED, 3)
    np.testing.assert_array_equal(matrix, HAND_CONFUSION)
    assert matrix.dtype == np.int64
    assert matrix.sum() == 7  # the ignored pixel (predicted 0 there) is not counted anywhere


def test_ignore_pixels_are_skipped_whatever_the_prediction() -> None:
    truth = np.full((3, 3), IGNORE_INDEX, dtype=np.uint8)
    truth[0, 0] = 1
    predicted = np.full((3, 3), 200, dtype=np.uint8)  # garbage where ignored: neither counted nor an error
    predicted[0, 0] = 1
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[1, 1] = 1
    np.testing.assert_array_equal(confusion_matrix(truth, predicted, 3), expected)


def test_confusion_matrix_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 3, size=(97, 113)).astype(np.uint8)
    truth[rng.random(truth.shape) < 0.1] = IGNORE_INDEX
    predicted = rng.integers(0, 3, size=truth.shape).astype(np.uint8)
    kept = truth != IGNORE_INDEX
    expected = sklearn.metrics.confusion_matrix(truth[kept], predicted[kept], labels=range(3))
    np.testing.assert_array_equal(confusion_matrix(truth, predicted, 3), expected)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(InvalidParameterError, match=r"\(2, 4\).*\(4, 2\)"):
        confusion_matrix(TRUTH, PRED.reshape(4, 2), 3)


@pytest.mark.parametrize(
    ("truth", "predicted", "message"),
    [
        (np.array([[0, 3], [7, 1]], np.uint8), np.zeros((2, 2), np.uint8), r"reference mask holds values 3, 7\b"),
        (np.zeros((2, 2), np.uint8), np.array([[0, 5], [1, 2]], np.uint8), r"predicted mask holds values 5\b"),
        (np.zeros((2, 2), np.uint8), np.array([[0, 255], [1, 2]], np.uint8), r"predicted mask holds values 255"),
        (np.array([[-1, 0]], np.int16), np.zeros((1, 2), np.int16), r"reference mask holds values -1\b"),
    ],
)
def test_out_of_range_labels_raise_naming_the_values(truth, predicted, message) -> None:
    with pytest.raises(InvalidParameterError, match=message) as info:
        confusion_matrix(truth, predicted, 3)
    assert "0..2" in str(info.value)


def test_float_masks_and_ignore_inside_classes_are_rejected() -> None:
    with pytest.raises(InvalidParameterError, match="dtype float"):
        confusion_matrix(TRUTH.astype(float), PRED, 3)
    with pytest.raises(InvalidParameterError, match="ignore_index 1"):
        confusion_matrix(TRUTH, PRED, 3, ignore_index=1)


# --- scores -----------------------------------------------------------------------------------------------------


def test_scores_hand_computed() -> None:
    scores = segmentation_scores(HAND_CONFUSION, SEG_CLASS_NAMES)
    background, non_tumour, tumour = (scores["classes"][name] for name in SEG_CLASS_NAMES)
    # background: TP 1, FN 1, FP 0
    assert background["iou"] == pytest.approx(1 / 2)
    assert background["dice"] == pytest.approx(2 / 3)
    assert background["precision"] == pytest.approx(1.0)
    assert background["recall"] == pytest.approx(1 / 2)
    assert background["support"] == 2
    # non_tumour: TP 3, FN 1, FP 1
    assert non_tumour["iou"] == pytest.approx(3 / 5)
    assert non_tumour["dice"] == pytest.approx(6 / 8)
    assert non_tumour["precision"] == pytest.approx(3 / 4)
    assert non_tumour["recall"] == pytest.approx(3 / 4)
    # tumour: TP 1, FN 0, FP 1
    assert tumour["iou"] == pytest.approx(1 / 2)
    assert tumour["dice"] == pytest.approx(2 / 3)
    assert tumour["precision"] == pytest.approx(1 / 2)
    assert tumour["recall"] == pytest.approx(1.0)
    assert tumour["support"] == 1
    for entry in (background, non_tumour, tumour):
        assert entry["f1"] == entry["dice"]
    assert scores["mean"]["iou"] == pytest.approx((1 / 2 + 3 / 5 + 1 / 2) / 3)
    assert scores["mean"]["dice"] == pytest.approx((2 / 3 + 6 / 8 + 2 / 3) / 3)
    assert scores["mean"]["support"] == 7
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    json.dumps(scores, allow_nan=False)  # plain Python values only
    assert all(type(v) is float for v in background.values() if not isinstance(v, int))


def test_scores_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, size=500)
    predicted = np.where(rng.random(500) < 0.6, truth, rng.integers(0, 3, size=500))
    scores = segmentation_scores(confusion_matrix(truth, predicted, 3), SEG_CLASS_NAMES)
    precision, recall, f1, support = sklearn.metrics.precision_recall_fscore_support(
        truth, predicted, labels=range(3), zero_division=0
    )
    iou = sklearn.metrics.jaccard_score(truth, predicted, labels=range(3), average=None)
    for index, name in enumerate(SEG_CLASS_NAMES):
        entry = scores["classes"][name]
        assert entry["precision"] == pytest.approx(precision[index])
        assert entry["recall"] == pytest.approx(recall[index])
        assert entry["f1"] == pytest.approx(f1[index])
        assert entry["iou"] == pytest.approx(iou[index])
        assert entry["support"] == support[index]
    assert scores["mean"]["iou"] == pytest.approx(iou.mean())
    assert scores["pixel_accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(truth, predicted))


def test_perfect_prediction_scores_one() -> None:
    scores = segmentation_scores(confusion_matrix(TRUTH, TRUTH, 3), SEG_CLASS_NAMES)
    for entry in (*scores["classes"].values(), scores["mean"]):
        for metric in ("iou", "dice", "precision", "recall", "f1"):
            assert entry[metric] == 1.0
    assert scores["pixel_accuracy"] == 1.0


def test_class_absent_from_both_is_none_and_left_out_of_the_mean() -> None:
    truth = np.array([[0, 0, 1, 1]], np.uint8)
    predicted = np.array([[0, 1, 1, 1]], np.uint8)
    scores = segmentation_scores(confusion_matrix(truth, predicted, 3), SEG_CLASS_NAMES)
    tumour = scores["classes"]["tumour"]
    assert {k: tumour[k] for k in ("iou", "dice", "precision", "recall", "f1")} == dict.fromkeys(
        ("iou", "dice", "precision", "recall", "f1")
    )
    assert tumour["support"] == 0
    assert scores["mean"]["iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # background 1/2, non_tumour 2/3
    json.dumps(scores, allow_nan=False)


def test_class_only_predicted_scores_zero_and_counts_in_the_mean() -> None:
    truth = np.array([[0, 0]], np.uint8)
    predicted = np.array([[0, 2]], np.uint8)
    scores = segmentation_scores(confusion_matrix(truth, predicted, 3), SEG_CLASS_NAMES)
    assert scores["classes"]["tumour"]["iou"] == 0.0
    assert scores["classes"]["tumour"]["recall"] == 0.0
    assert scores["classes"]["non_tumour"]["iou"] is None
    assert scores["mean"]["iou"] == pytest.approx((1 / 2 + 0.0) / 2)


def test_empty_matrix_scores_none() -> None:
    scores = segmentation_scores(np.zeros((3, 3), np.int64), SEG_CLASS_NAMES)
    assert scores["mean"]["iou"] is None and scores["pixel_accuracy"] is None
    assert "n/a" in scores_markdown(scores)


def test_scores_reject_wrong_class_names() -> None:
    with pytest.raises(InvalidParameterError, match="2 class names"):
        segmentation_scores(HAND_CONFUSION, ["a", "b"])
    with pytest.raises(InvalidParameterError, match="repeat"):
        segmentation_scores(HAND_CONFUSION, ["a", "b", "a"])


def test_markdown_has_every_class_and_the_mean() -> None:
    scores = segmentation_scores(HAND_CONFUSION, SEG_CLASS_NAMES)
    text = scores_markdown(scores)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[1:-1] == [
        f" {h} " for h in ("class", "IoU", "Dice", "precision", "recall", "F1", "support")
    ]
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == [*SEG_CLASS_NAMES, "**mean**"]
    assert "| non_tumour | 0.600 | 0.750 | 0.750 | 0.750 | 0.750 | 4 |" in text
    assert "0.714" in text  # pixel accuracy 5/7


# --- rasterisation ----------------------------------------------------------------------------------------------


def test_rasterize_square_exact_pixels() -> None:
    raster = rasterize_labels([(box(2, 3, 6, 8), 2)], (10, 10), 1.0)
    assert raster.dtype == np.uint8 and raster.shape == (10, 10)
    expected = np.zeros((10, 10), np.uint8)
    expected[3:8, 2:6] = 2
    np.testing.assert_array_equal(raster, expected)


def test_rasterize_polygon_hole_stays_fill() -> None:
    donut = Polygon(box(0, 0, 10, 10).exterior.coords, [box(3, 3, 7, 7).exterior.coords])
    raster = rasterize_labels([(donut, 1)], (12, 12), 1.0, fill=9)
    expected = np.full((12, 12), 9, np.uint8)
    expected[0:10, 0:10] = 1
    expected[3:7, 3:7] = 9
    np.testing.assert_array_equal(raster, expected)


def test_rasterize_multipolygon_with_hole() -> None:
    shape = MultiPolygon(
        [box(0, 0, 4, 4), Polygon(box(10, 10, 20, 20).exterior.coords, [box(13, 13, 17, 17).exterior.coords])]
    )
    raster = rasterize_labels([(shape, 1)], (24, 24), 1.0)
    np.testing.assert_array_equal(raster.astype(bool), centre_sampled(shape, 24, 24, 1.0))
    assert raster.sum() == 16 + 100 - 16


def test_rasterize_later_shape_wins() -> None:
    raster = rasterize_labels([(box(0, 0, 6, 6), 1), (box(3, 3, 9, 9), 2)], (10, 10), 1.0)
    assert raster[4, 4] == 2 and raster[1, 1] == 1 and raster[8, 8] == 2 and raster[9, 9] == 0
    assert (raster == 2).sum() == 36 and (raster == 1).sum() == 36 - 9
    reverse = rasterize_labels([(box(3, 3, 9, 9), 2), (box(0, 0, 6, 6), 1)], (10, 10), 1.0)
    assert reverse[4, 4] == 1


def test_rasterize_downsample_scales_coordinates() -> None:
    raster = rasterize_labels([(box(8, 4, 24, 20), 2)], (8, 6), 4.0)
    assert raster.shape == (6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[1:5, 2:6] = 2
    np.testing.assert_array_equal(raster, expected)


def test_rasterize_clips_shapes_partly_or_wholly_outside() -> None:
    shapes = [
        (box(-50, -50, 3, 3), 1),
        (box(7, 8, 1e9, 1e9), 2),
        (box(1e6, 1e6, 1e6 + 5, 1e6 + 5), 1),
        (Polygon(), 1),
    ]
    raster = rasterize_labels(shapes, (10, 10), 1.0)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:3, 0:3] = 1
    expected[8:, 7:] = 2
    np.testing.assert_array_equal(raster, expected)


def test_rasterize_curved_shapes_match_centre_sampling() -> None:
    """Discs with off-centre holes at odd positions and downsamples: exactly the brute-force centre test."""
    rng = np.random.default_rng(11)
    for downsample in (1.0, 2.5, 16.0):
        width, height = 37, 29
        for _ in range(5):
            cx, cy = rng.uniform(0, width * downsample), rng.uniform(0, height * downsample)
            radius = rng.uniform(3, 15) * downsample
            disc = Point(cx, cy).buffer(radius, quad_segs=16)
            hole = Point(cx + radius / 4, cy - radius / 5).buffer(radius / 2, quad_segs=16)
            shape = Polygon(disc.exterior.coords, [hole.exterior.coords])
            raster = rasterize_labels([(shape, 1)], (width, height), downsample)
            np.testing.assert_array_equal(raster.astype(bool), centre_sampled(shape, width, height, downsample))


def test_rasterize_rejects_bad_inputs() -> None:
    with pytest.raises(InvalidParameterError, match="LineString"):
        rasterize_labels([(shapely.LineString([(0, 0), (5, 5)]), 1)], (10, 10), 1.0)
    with pytest.raises(InvalidParameterError, match="label of shape 0 300"):
        rasterize_labels([(box(0, 0, 2, 2), 300)], (10, 10), 1.0)
    with pytest.raises(InvalidParameterError, match="downsample"):
        rasterize_labels([], (10, 10), 0.0)
    with pytest.raises(InvalidParameterError, match="size_px"):
        rasterize_labels([], (0, 10), 1.0)


# --- evaluation -------------------------------------------------------------------------------------------------


def test_evaluate_pairs_sums_confusion_over_pairs() -> None:
    second_truth = np.array([[2, 2, 0]], np.uint8)
    second_pred = np.array([[2, 0, 0]], np.uint8)
    scores = evaluate_pairs(iter([(TRUTH, PRED), (second_truth, second_pred)]), SEG_CLASS_NAMES)
    expected = HAND_CONFUSION + confusion_matrix(second_truth, second_pred, 3)
    assert scores["confusion_matrix"] == expected.tolist()
    assert scores == segmentation_scores(expected, SEG_CLASS_NAMES)


def test_evaluate_pairs_names_the_bad_pair_and_rejects_none() -> None:
    with pytest.raises(InvalidParameterError, match=r"mask pair 1: .*shape"):
        evaluate_pairs([(TRUTH, PRED), (TRUTH, PRED[:, :2])], SEG_CLASS_NAMES)
    with pytest.raises(InvalidParameterError, match="no .* mask pairs"):
        evaluate_pairs([], SEG_CLASS_NAMES)


def test_write_evaluation_writes_both_files_and_no_temporaries(tmp_path: Path) -> None:
    scores = segmentation_scores(HAND_CONFUSION, SEG_CLASS_NAMES)
    out_dir = tmp_path / "results" / "eval"
    json_path, markdown_path = write_evaluation(scores, out_dir, "val")
    assert (json_path, markdown_path) == (out_dir / "val.json", out_dir / "val.md")
    assert json.loads(json_path.read_text()) == scores
    assert markdown_path.read_text() == scores_markdown(scores)
    assert sorted(p.name for p in out_dir.iterdir()) == ["val.json", "val.md"]
    # Writing again replaces both, still with nothing else left in the folder.
    write_evaluation(segmentation_scores(np.eye(3, dtype=np.int64), SEG_CLASS_NAMES), out_dir, "val")
    assert json.loads(json_path.read_text())["pixel_accuracy"] == 1.0
    assert sorted(p.name for p in out_dir.iterdir()) == ["val.json", "val.md"]


def test_write_evaluation_failure_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scores = segmentation_scores(HAND_CONFUSION, SEG_CLASS_NAMES)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hepatoquant.segmentation.evaluate.os.replace", failing_replace)
    with pytest.raises(OutputWriteError, match="No space left") as info:
        write_evaluation(scores, tmp_path, "val")
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        write_evaluation({**scores, "pixel_accuracy": float("nan")}, tmp_path, "val")
    with pytest.raises(InvalidParameterError, match="stem"):
        write_evaluation(scores, tmp_path, "../val")
    assert list(tmp_path.iterdir()) == []
