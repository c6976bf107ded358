"""Files appear whole or not at all: write beside the target, then rename over it.
Standard library only: config.py (imported by the Snakefile) uses it too."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A temporary name beside `path`, its own to this process and thread: two jobs writing one
    file (an orphan of a killed run and the rerun) never rename each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_json(data, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
