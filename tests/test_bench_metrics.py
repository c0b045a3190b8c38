"""Tests of HepatoBench classification metrics: hand-computed scores on a 10-sample example, bootstrap intervals
(exact on a perfect probe, containing the estimate, narrowing with more samples, reproducible, equal to
scikit-learn on each resample), absent classes without warnings, input errors, and the confusion-matrix outputs."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics
from PIL import Image

from hepatoquant.bench.metrics import (
    CI_METRICS,
    _cell_counts,
    _scores_from_counts,
    classification_metrics,
    confusion_matrix_table,
    plot_confusion_matrix,
)
from hepatoquant.errors import InvalidParameterError, OutputWriteError

CLASSES = ["TUM", "FIB", "NOR"]
# (true, predicted): TUM (0,0)(0,0)(0,0)(0,1); FIB (1,1)(1,1)(1,2); NOR (2,2)(2,2)(2,0)
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
HAND_CONFUSION = [[3, 1, 0], [0, 2, 1], [1, 0, 2]]


def noisy_labels(n: int, num_classes: int, seed: int, correct: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, num_classes, size=n)
    predicted = np.where(rng.random(n) < correct, truth, rng.integers(0, num_classes, size=n))
    return truth, predicted


# --- point estimates --------------------------------------------------------------------------------------------


def test_hand_computed_scores_on_ten_samples() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, bootstrap=0)
    assert m["classes"] == CLASSES
    assert m["n_samples"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    # Recall: TUM 3/4, FIB 2/3, NOR 2/3; precision: TUM 3/4 (column 3,0,1), FIB 2/3, NOR 2/3.
    assert [m["per_class"][c]["recall"] for c in CLASSES] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert [m["per_class"][c]["precision"] for c in CLASSES] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert [m["per_class"][c]["support"] for c in CLASSES] == [4, 3, 3]
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    # Per-class F1 equals precision = recall here: 3/4, 2/3, 2/3.
    assert m["f1_macro"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx((4 * 3 / 4 + 3 * 2 / 3 + 3 * 2 / 3) / 10)
    assert m["confusion_matrix"] == HAND_CONFUSION  # rows = true class, columns = predicted, order of CLASSES
    assert m["ci"] == {}
    assert m["notes"] == []


def test_asymmetric_example_separates_precision_recall_and_averages() -> None:
    # TUM (0,0)(0,0)(0,1)(0,1); FIB (1,1); NOR (2,0) -> recall 1/2, 1, 0; precision 2/3, 1/3, 0.
    truth, predicted = np.array([0, 0, 0, 0, 1, 2]), np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(truth, predicted, CLASSES, bootstrap=0)
    assert [m["per_class"][c]["recall"] for c in CLASSES] == pytest.approx([1 / 2, 1, 0])
    assert [m["per_class"][c]["precision"] for c in CLASSES] == pytest.approx([2 / 3, 1 / 3, 0])
    f1 = [2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2), 2 * (1 / 3) / (1 / 3 + 1), 0.0]
    assert [m["per_class"][c]["f1"] for c in CLASSES] == pytest.approx(f1)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["f1_weighted"] == pytest.approx((4 * f1[0] + f1[1] + f1[2]) / 6)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 3) / 3)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"]) and m["accuracy"] == pytest.approx(3 / 6)


def test_output_is_json_ready_with_documented_keys() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, bootstrap=np.int64(50), seed=np.int64(3))
    assert list(m) == [
        "classes", "n_samples", "accuracy", "balanced_accuracy",
        "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted",
        "per_class", "confusion_matrix", "confusion_matrix_axes", "ci", "bootstrap", "notes",
    ]  # fmt: skip
    assert list(m["per_class"]) == CLASSES
    assert set(m["ci"]) == set(CI_METRICS)
    assert m["bootstrap"] == {"resamples": 50, "seed": 3, "confidence": 0.95, "method": "percentile"}
    assert json.loads(json.dumps(m, allow_nan=False)) == m  # NumPy options are echoed as plain ints


def test_absent_class_scores_zero_without_any_warning() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])  # NOR never predicted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = classification_metrics(truth, predicted, CLASSES, bootstrap=200)
    assert caught == [], [str(w.message) for w in caught]
    assert m["per_class"]["NOR"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["notes"] == ["class NOR is never predicted: its precision is reported as 0"]


def test_class_absent_from_the_split_counts_zero_in_macro_but_not_in_balanced_accuracy() -> None:
    truth = np.array([0, 0, 1, 1])
    predicted = np.array([0, 2, 1, 1])  # NOR has no true sample but is predicted once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = classification_metrics(truth, predicted, CLASSES, bootstrap=100)
    assert caught == [], [str(w.message) for w in caught]
    assert m["per_class"]["NOR"]["support"] == 0
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert "class NOR has no true sample" in m["notes"][0]
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


# --- bootstrap --------------------------------------------------------------------------------------------------


def test_perfect_prediction_has_interval_one_one() -> None:
    truth = np.repeat(np.arange(3), 40)
    m = classification_metrics(truth, truth.copy(), CLASSES, bootstrap=300)
    for name in CI_METRICS:
        assert m["ci"][name] == [1.0, 1.0], name
        assert m[name] == 1.0


def test_interval_contains_estimate_and_narrows_with_more_samples() -> None:
    truth, predicted = noisy_labels(60, 3, seed=1, correct=0.7)
    small = classification_metrics(truth, predicted, CLASSES, bootstrap=500, seed=0)
    large = classification_metrics(np.tile(truth, 100), np.tile(predicted, 100), CLASSES, bootstrap=500, seed=0)
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted"):
        for m in (small, large):
            low, high = m["ci"][name]
            assert low <= m[name] <= high, (name, m[name], low, high)
        assert large[name] == pytest.approx(small[name])  # same distribution, 100 times the samples
        small_width = small["ci"][name][1] - small["ci"][name][0]
        large_width = large["ci"][name][1] - large["ci"][name][0]
        assert 0 < large_width < small_width / 5, (name, small_width, large_width)


def test_confidence_level_widens_the_interval() -> None:
    truth, predicted = noisy_labels(200, 3, seed=2)
    narrow = classification_metrics(truth, predicted, CLASSES, bootstrap=400, confidence=0.5)["ci"]["accuracy"]
    wide = classification_metrics(truth, predicted, CLASSES, bootstrap=400, confidence=0.99)["ci"]["accuracy"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_same_seed_reproduces_and_another_seed_differs() -> None:
    truth, predicted = noisy_labels(300, 4, seed=5)
    classes = [*CLASSES, "STE"]
    first = classification_metrics(truth, predicted, classes, bootstrap=200, seed=11)
    second = classification_metrics(truth, predicted, classes, bootstrap=200, seed=11)
    other = classification_metrics(truth, predicted, classes, bootstrap=200, seed=12)
    assert first == second
    assert first["ci"] != other["ci"]


def test_vectorised_bootstrap_equals_sklearn_on_each_resample() -> None:
    truth, predicted = noisy_labels(80, 4, seed=9, correct=0.6)
    truth[truth == 3] = 2  # class 3 has no true sample: exercises absent classes in every resample
    rng = np.random.default_rng(0)
    indices = rng.integers(0, truth.size, size=(25, truth.size))
    indices[0] = np.flatnonzero(truth != 2)[0]  # a degenerate resample: one sample repeated
    scores = _scores_from_counts(_cell_counts(truth * 4 + predicted, 16, indices), 4)
    labels = list(range(4))
    for row, sample in enumerate(indices):
        t, p = truth[sample], predicted[sample]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # balanced accuracy warns about predicted classes absent from t
            expected = {"accuracy": sklearn.metrics.accuracy_score(t, p),
                        "balanced_accuracy": sklearn.metrics.balanced_accuracy_score(t, p)}
        for average in ("macro", "weighted"):
            pr, rc, f1, _ = sklearn.metrics.precision_recall_fscore_support(
                t, p, labels=labels, average=average, zero_division=0
            )
            expected |= {f"precision_{average}": pr, f"recall_{average}": rc, f"f1_{average}": f1}
        for name in CI_METRICS:
            assert scores[name][row] == pytest.approx(expected[name], abs=1e-12), (row, name)


def test_thousand_resamples_of_ten_thousand_samples_are_fast() -> None:
    truth, predicted = noisy_labels(10_000, 7, seed=3, correct=0.9)
    start = time.perf_counter()
    m = classification_metrics(truth, predicted, [f"C{i}" for i in range(7)], bootstrap=1000)
    assert time.perf_counter() - start < 5.0
    low, high = m["ci"]["accuracy"]
    assert 0.005 < high - low < 0.03  # about +-1.96 * sqrt(0.91 * 0.09 / 10000) = +-0.0056


# --- input errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y_true", "y_pred", "classes", "message"),
    [
        ([0, 1, 2], [0, 1], CLASSES, "y_true has 3 labels but y_pred has 2"),
        ([], [], CLASSES, "y_true is empty"),
        ([0, 1, 3], [0, 1, 2], CLASSES, "y_true holds labels 3 outside 0..2"),
        ([0, 1, 2], [0, -1, 5], CLASSES, "y_pred holds labels -1, 5 outside 0..2"),
        ([0.0, 1.0], [0, 1], CLASSES, "y_true has dtype float64"),
        ([[0, 1]], [[0, 1]], CLASSES, "y_true has shape (1, 2)"),
        (["TUM"], ["TUM"], CLASSES, "y_true has dtype <U3"),
        ([0, 1], [0, 1], "TUM", "classes must be a list of class names"),
        ([0, 1], [0, 1], ["TUM", "TUM"], "repeat ['TUM']"),
        ([0], [0], ["TUM"], "fewer than two classes"),
    ],
)
def test_invalid_labels_are_refused_with_the_problem_named(y_true, y_pred, classes, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=re.escape(message)):
        classification_metrics(np.asarray(y_true), np.asarray(y_pred), classes, bootstrap=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bootstrap": -1}, "bootstrap must be a number of resamples >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"confidence": 1.0}, "confidence must lie strictly between 0 and 1"),
        ({"confidence": 95}, "confidence must lie strictly between 0 and 1"),
    ],
)
def test_invalid_bootstrap_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):  # also a ValueError, for callers that catch that
        classification_metrics(Y_TRUE, Y_PRED, CLASSES, **options)


# --- confusion-matrix outputs -----------------------------------------------------------------------------------


def test_confusion_matrix_table_lists_counts_by_class() -> None:
    table = confusion_matrix_table(classification_metrics(Y_TRUE, Y_PRED, CLASSES, bootstrap=0))
    lines = table.splitlines()
    assert lines[0] == "| true \\ predicted | TUM | FIB | NOR | support |"
    assert lines[2] == "| **TUM** | 3 | 1 | 0 | 4 |"
    assert lines[3] == "| **FIB** | 0 | 2 | 1 | 3 |"
    assert lines[4] == "| **NOR** | 1 | 0 | 2 | 3 |"
    assert lines[5] == "| *predicted* | 4 | 3 | 3 | 10 |"


def test_table_and_plot_refuse_a_dict_that_is_not_metrics(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="pass the dict classification_metrics returned"):
        confusion_matrix_table({"accuracy": 0.5})
    with pytest.raises(InvalidParameterError, match="must be square integer counts"):
        plot_confusion_matrix({"classes": ["a", "b"], "confusion_matrix": [[1, 2]]}, tmp_path / "x.png")


def test_plot_is_a_readable_png_written_atomically(tmp_path: Path) -> None:
    m = classification_metrics(*noisy_labels(500, 7, seed=4), [f"C{i}" for i in range(7)], bootstrap=0)
    path = plot_confusion_matrix(m, tmp_path / "plots" / "cm.png", title="UNI on HepatoBench")
    assert path == tmp_path / "plots" / "cm.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()
    assert 400 <= width <= 2000 and 400 <= height <= 2000
    assert sorted(p.name for p in path.parent.iterdir()) == ["cm.png"]  # no temporary file left
    # A row-normalised plot is not blank: the diagonal is drawn darker than the background.
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.min() < 100 and pixels.max() > 240


def test_plot_refuses_other_suffixes_and_reports_unwritable_folders(tmp_path: Path) -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, bootstrap=0)
    with pytest.raises(InvalidParameterError, match=r"must end in \.png"):
        plot_confusion_matrix(m, tmp_path / "cm.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputWriteError, match="could not write the confusion matrix plot"):
        plot_confusion_matrix(m, blocker / "cm.png")
