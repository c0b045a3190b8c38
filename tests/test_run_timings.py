"""Issue 20: the report's timings cover the whole run (start-up, model look-up and loading, each stage, each
output) and add up to the wall time measured from outside; ``--profile`` writes a trace and a profile a user can
open. Was: start-up, model loading from disk and output writing left out, a third of the wall time."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

from hepatoquant.model_pack import ensure_demo_pack


def test_the_reports_timings_add_up_to_the_wall_time_and_the_profile_opens(cmu_slide: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    trace = tmp_path / "trace.json"
    spawned_at = time.time()  # the wall clock: compared with the report file's modification time below
    run = subprocess.run(
        [sys.executable, "-m", "hepatoquant.cli", "--models-dir", str(models), "analyze", str(cmu_slide),
         "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu", "--profile", str(trace)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = next((tmp_path / "out").glob("*.report.json"))
    timings = json.loads(report.read_text())["timings_s"]
    stages = {k: v for k, v in timings.items() if k not in ("other", "total")}
    assert {"startup", "model_lookup", "tissue_detection", "tiling", "model_loading", "classification",
            "quantification", "write_geojson", "write_overlay"} <= set(stages)
    assert abs(sum(stages.values()) + timings["other"] - timings["total"]) < 0.01  # they add up
    # the whole run up to the report's writing, measured from outside: from the process's spawn to the report
    # file's modification time. What follows the report (the profile's dump, the summary printed, the
    # interpreter's exit) is not in it and is not compared: on a loaded CI machine it took 1.9 s of a 10.9 s run
    # with --profile, which made a comparison with the process's end fail although every stage was counted.
    # The process's start is known to 10 ms, file times to a few ms.
    until_report = report.stat().st_mtime - spawned_at
    assert 0.9 * until_report < timings["total"] <= until_report + 0.05, (timings, until_report)
    assert timings["other"] < 0.1 * timings["total"], timings  # little that no stage covers
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["name"] for e in events} == set(stages) and all(e["ph"] == "X" and e["dur"] >= 0 for e in events)
    profile = pstats.Stats(str(trace.with_suffix(".pstats")))
    assert any(name == "analyze_slide" for (_, _, name) in profile.stats)
