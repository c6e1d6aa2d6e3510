"""The one way a benchmark writes its result: `bench/results/NAME.json` (or --out's folder), printed as well."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def write_result(folder: str | Path, name: str, result: dict, shown: dict | None = None, indent: int = 2) -> Path:
    """Write `result` to FOLDER/NAME.json; print `shown` (default: the whole result) and the path (to stderr)."""
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    print(json.dumps(result if shown is None else shown, indent=indent))
    print(f"wrote {path}", file=sys.stderr)
    return path
