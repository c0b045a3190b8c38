"""The import contracts of ``.importlinter``, checked with import-linter (issue 18): the client never imports
the server, cohort runs never import the gRPC service, and no package's modules import each other in a circle.
Before, ``hepatoquant.cohort.runner`` imported ``hepatoquant.service.convert`` and two circles stood
(``model_pack`` <-> ``segmentation.pack``, ``service.executor`` -> ``status`` -> ``executor``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def test_the_import_contracts_hold() -> None:
    done = subprocess.run([LINT_IMPORTS, "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_a_broken_contract_is_caught(tmp_path: Path) -> None:
    """The checker really looks: the command line does import the analysis, so forbidding it must fail."""
    config = tmp_path / "broken.ini"
    config.write_text("[importlinter]\nroot_packages =\n    hepatoquant\n\n[importlinter:contract:x]\nname = x\n"
                      "type = forbidden\nsource_modules =\n    hepatoquant.cli\nforbidden_modules =\n"
                      "    hepatoquant.analysis\n")
    done = subprocess.run([LINT_IMPORTS, "--config", str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "BROKEN" in done.stdout
