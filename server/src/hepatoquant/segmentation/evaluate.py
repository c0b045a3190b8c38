"""Evaluation of a segmentation over many masks: one confusion matrix summed over all pairs, scored once.

Summing before scoring weights every pixel equally (a large slide counts more than a small one), which is
what pixel IoU and Dice over a test set mean. The scores are written as JSON and as a Markdown table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from hepatoquant.atomic_write import write_file_atomic
from hepatoquant.errors import InvalidParameterError
from hepatoquant.segmentation import IGNORE_INDEX
from hepatoquant.segmentation.metrics import confusion_matrix, scores_markdown, segmentation_scores

__all__ = ["evaluate_pairs", "write_evaluation"]


def evaluate_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """Scores (see :func:`segmentation_scores`) of the confusion matrix summed over (reference, predicted) pairs.

    Masks hold class indices in the order of ``class_names``; reference pixels equal to ``ignore_index`` are
    skipped. Pairs are consumed one at a time, so a generator keeps only one pair in memory.
    """
    names = list(class_names)
    total = np.zeros((len(names), len(names)), dtype=np.int64)
    count = 0
    for index, (truth, predicted) in enumerate(pairs):
        try:
            total += confusion_matrix(truth, predicted, len(names), ignore_index=ignore_index)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"mask pair {index}: {exc}") from exc
        count += 1
    if not count:
        raise InvalidParameterError("no (reference, predicted) mask pairs were given to evaluate")
    return segmentation_scores(total, names)


def write_evaluation(scores: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (created if needed); returns both paths.

    Each file is written to a temporary file in ``out_dir`` and renamed into place, so a reader never sees a
    half-written file and a failure leaves no temporary file behind.
    """
    if not stem or stem in {".", ".."} or "/" in stem or os.sep in stem:
        raise InvalidParameterError(f"output name {stem!r} must be a plain file name stem, without folders")
    out_dir = Path(out_dir)
    json_text = json.dumps(scores, indent=2, allow_nan=False) + "\n"
    markdown_text = scores_markdown(scores)
    json_path, markdown_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_file_atomic(json_path, lambda handle: handle.write(json_text.encode()), what="evaluation JSON")
    write_file_atomic(markdown_path, lambda handle: handle.write(markdown_text.encode()), what="evaluation table")
    return json_path, markdown_path

