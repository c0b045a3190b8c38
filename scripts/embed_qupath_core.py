"""Copy the shared Groovy of qupath_scripts/core/ into every qupath_scripts/HepatoQuant_*.groovy.

QuPath runs one script file at a time and a pathologist copies single files, so each script carries the shared
code between marker lines: the plain logic (``BEGIN HEPATOQUANT CORE`` ... ``END HEPATOQUANT CORE``, from
``core/HepatoQuantCore.groovy``) and, where a script uses them, the shared QuPath-side helpers (``BEGIN
HEPATOQUANT QUPATH LAYER`` ..., from ``core/HepatoQuantQuPath.groovy``). Edit the files in ``core/``, then run
``python scripts/embed_qupath_core.py``; ``--check`` only reports stale copies (exit 1), as the tests do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "qupath_scripts"
#: Marker name -> the file whose text goes between "// ---- BEGIN <name>" and "// ---- END <name>".
BLOCKS = {
    "HEPATOQUANT CORE": SCRIPTS_DIR / "core" / "HepatoQuantCore.groovy",
    "HEPATOQUANT QUPATH LAYER": SCRIPTS_DIR / "core" / "HepatoQuantQuPath.groovy",
}


def script_files() -> list[Path]:
    return sorted(SCRIPTS_DIR.glob("HepatoQuant_*.groovy"))


def with_block(script_text: str, block: str, block_text: str, name: str) -> str:
    """The script text with block_text between the block's marker lines; unchanged if the script has none."""
    begin, end = f"// ---- BEGIN {block}", f"// ---- END {block}"
    lines = script_text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.startswith(begin + " ") or line.rstrip() == begin]
    ends = [i for i, line in enumerate(lines) if line.startswith(end + " ") or line.rstrip() == end]
    if not begins and not ends:
        return script_text
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise SystemExit(f"{name}: needs one '{begin}' line followed by one '{end}' line")
    body = block_text if block_text.endswith("\n") else block_text + "\n"
    return "".join(lines[: begins[0] + 1]) + body + "".join(lines[ends[0]:])


def embedded(script_text: str, name: str) -> str:
    """The script text with every shared block refreshed."""
    for block, source in BLOCKS.items():
        script_text = with_block(script_text, block, source.read_text(encoding="utf-8"), name)
    return script_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale scripts, change nothing")
    args = parser.parse_args(argv)
    stale = []
    for path in script_files():
        text = path.read_text(encoding="utf-8")
        updated = embedded(text, path.name)
        if updated != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(updated, encoding="utf-8")
    if args.check and stale:
        print(f"stale core in {', '.join(stale)}: run python scripts/embed_qupath_core.py", file=sys.stderr)
        return 1
    for name in stale:
        print(f"updated {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
