"""Issue 20: with a segmenter, the segmentation runs alongside the classification on a GPU (its own windows, its
own model; only the quantification needs both), before it on a CPU. Its failure ends the classification early, a failed or cancelled
classification stops it, watchers see one stage at a time, and the report's timings say what overlapped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dataclasses

import pytest
import torch

from hepatoquant import analysis
from hepatoquant.analysis import AnalysisOptions, analyze_slide, segments_alongside
from hepatoquant.errors import CorruptSlideError, JobCancelledError
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.run_clock import RunClock
from hepatoquant.segmentation.inference import SlidingWindowParams
from hepatoquant.segmentation.pack import ensure_demo_segmentation_pack

OPTIONS = AnalysisOptions(device="cpu", backend="torch", batch_size=4, segment_alongside=True,
                          windows=SlidingWindowParams(batch_size=1, num_workers=1))


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("overlap-models")
    return ensure_demo_pack(models, encoder="test_vit_micro"), ensure_demo_segmentation_pack(models,
                                                                                             encoder="test_vit_micro")


def _segmentation_slowed(monkeypatch: pytest.MonkeyPatch, before_s: float = 0.0, per_window_s: float = 0.0,
                         windows_run: list | None = None, fail: Exception | None = None) -> None:
    """segment_slide, made to start late, to take time per window, to count its windows or to fail."""
    real = analysis.segment_slide

    def slowed(*args, progress, **kwargs):
        time.sleep(before_s)
        if fail is not None:
            raise fail

        def counted(done: int, total: int) -> None:
            if windows_run is not None:
                windows_run.append(done)
            time.sleep(per_window_s)
            progress(done, total)

        return real(*args, progress=counted, **kwargs)

    monkeypatch.setattr(analysis, "segment_slide", slowed)


def _segmentation_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("segmentation") and t.is_alive()}


def test_the_segmentation_runs_while_the_tiles_are_classified(cmu_slide: Path, packs, monkeypatch) -> None:
    classifier, segmenter = packs
    _segmentation_slowed(monkeypatch, before_s=1.0)
    clock = RunClock()
    reports: list[tuple[str, int, int]] = []
    result = analyze_slide(cmu_slide, classifier, OPTIONS, segmenter=segmenter, clock=clock,
                           progress=lambda stage, done, total: reports.append((stage, done, total)))
    spans = {name: (start, end) for name, start, end, _ in clock.spans}
    segmentation, classification = spans["segmentation"], spans["classification"]
    assert classification[0] < segmentation[1] and segmentation[0] < classification[1]  # at the same time
    assert result.segmentation is not None and result.regions  # and its regions are used
    assert {r.source for r in result.regions} == {"segmenter"} and result.composition.to_dict()
    summary = clock.summary()
    assert summary["overlapped"] > 0.2
    stages = sum(v for k, v in summary.items() if k not in ("overlapped", "other", "total"))
    assert abs(stages - summary["overlapped"] + summary["other"] - summary["total"]) < 1e-6
    # One stage at a time for watchers: the windows' progress only after the last tile's.
    stages_in_order = [stage for stage, _, _ in reports]
    last_tile = max(i for i, stage in enumerate(stages_in_order) if stage == "tiles")
    assert "windows" in stages_in_order and all(stage != "windows" for stage in stages_in_order[:last_tile])
    assert reports[last_tile][1] == reports[last_tile][2]


def test_a_failed_segmentation_ends_the_classification_early(cmu_slide: Path, packs, monkeypatch) -> None:
    classifier, segmenter = packs
    _segmentation_slowed(monkeypatch, fail=CorruptSlideError("windows unreadable"))
    tiles_done: list[int] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "tiles":
            tiles_done.append(done)
            time.sleep(0.05)  # slow tiles: the segmentation has long failed before the last one

    with pytest.raises(CorruptSlideError, match="windows unreadable"):
        analyze_slide(cmu_slide, classifier, OPTIONS, segmenter=segmenter, progress=progress)
    assert max(tiles_done) < 104 / 2, tiles_done  # CMU-1-Small-Region has 104 tiles
    assert _segmentation_threads() == set()


def test_a_cancelled_classification_stops_the_segmentation(cmu_slide: Path, packs, monkeypatch) -> None:
    classifier, segmenter = packs
    windows_run: list[int] = []
    _segmentation_slowed(monkeypatch, per_window_s=0.2, windows_run=windows_run)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "tiles" and done > 0:
            raise JobCancelledError("job x was stopped (cancelled)")

    with pytest.raises(JobCancelledError):
        analyze_slide(cmu_slide, classifier, OPTIONS, segmenter=segmenter, progress=progress)
    assert _segmentation_threads() == set()  # ended, not left running
    with_all_windows = len(windows_run)
    time.sleep(0.5)
    assert len(windows_run) == with_all_windows  # and nothing more read after the call returned
    assert with_all_windows <= 3, windows_run  # it stopped at its next window, not after all of them


def test_a_cancellation_while_waiting_for_the_segmentation_ends_it(cmu_slide: Path, packs, monkeypatch) -> None:
    classifier, segmenter = packs
    _segmentation_slowed(monkeypatch, per_window_s=0.2)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "windows" and done >= 1:
            raise JobCancelledError("job x was stopped (cancelled)")

    with pytest.raises(JobCancelledError):
        analyze_slide(cmu_slide, classifier, OPTIONS, segmenter=segmenter, progress=progress)
    assert _segmentation_threads() == set()


def test_the_clock_counts_overlapping_stages_once_in_the_total() -> None:
    clock = RunClock()
    started = threading.Event()

    def beside() -> None:
        with clock.stage("b"):
            started.set()
            time.sleep(0.3)

    thread = threading.Thread(target=beside)
    with clock.stage("a"):
        thread.start()
        started.wait()
        time.sleep(0.1)
    thread.join()
    summary = clock.summary()
    assert 0.08 < summary["overlapped"] < 0.2  # a ran 0.1 s of b's 0.3 s
    assert abs(summary["a"] + summary["b"] - summary["overlapped"] + summary["other"] - summary["total"]) < 1e-6
    assert "overlapped" not in RunClock().summary()


def test_alongside_on_a_gpu_and_before_on_a_cpu_unless_asked(cmu_slide: Path, packs) -> None:
    assert segments_alongside(AnalysisOptions(), torch.device("cuda", 0))
    assert not segments_alongside(AnalysisOptions(), torch.device("cpu"))
    assert segments_alongside(AnalysisOptions(segment_alongside=True), torch.device("cpu"))
    assert not segments_alongside(AnalysisOptions(segment_alongside=False), torch.device("cuda", 0))
    classifier, segmenter = packs
    clock = RunClock()
    reports: list[str] = []
    analyze_slide(cmu_slide, classifier, dataclasses.replace(OPTIONS, segment_alongside=None), segmenter=segmenter,
                  clock=clock, progress=lambda stage, done, total: reports.append(stage))
    spans = {name: (start, end) for name, start, end, _ in clock.spans}
    assert spans["segmentation"][1] <= spans["classification"][0]  # one after the other on this CPU
    assert "overlapped" not in clock.summary()
    assert reports.index("tiles") > max(i for i, stage in enumerate(reports) if stage == "windows")
