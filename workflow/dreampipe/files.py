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


def human_size(nbytes: float) -> str:
    """1536 -> '1.5 KiB': a size in the unit that shows its figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def umask_mode(path: Path) -> None:
    """Give a written file (or every file and folder under it) the mode a plain open() would:
    some writers (safetensors) create private 0600 files, which other users of a shared model
    folder cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
