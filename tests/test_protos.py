"""The committed gRPC stubs are exactly what protoc makes from protos/ (regenerate with scripts/generate_protos.sh)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = Path("hepatoquant_client") / "_generated"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "generate_protos.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / GENERATED).rglob("*") if p.is_file())
    committed_root = ROOT / "python_client" / "src"
    committed = sorted(p.relative_to(committed_root) for p in (committed_root / GENERATED).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed
    different = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed_root / p, shallow=False)]
    assert not different, f"stubs out of date: {different}; run scripts/generate_protos.sh"


def test_the_service_has_every_rpc_of_the_api() -> None:
    from hepatoquant_client.proto import pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["HepatoQuant"].methods}
    assert methods == {"GetServerInfo", "SubmitAnalysis", "WatchJob", "GetJob", "GetResult", "CancelJob",
                       "ListJobs", "ClassifyTiles"}
