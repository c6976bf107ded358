"""The resumable training state folder (results/<name>/.state): one trainer at a time, and a state
file that cannot be read is set aside instead of failing every rerun.

The lock is an flock on a file beside the folder (the folder itself is deleted and recreated),
held until the trainer's process ends: the kernel drops it when the process dies in any way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import zipfile
from pathlib import Path

from .errors import DreampipeError

log = logging.getLogger("dreampipe.train")
_held: dict[Path, object] = {}  # lock files kept open (and so locked) until the process exits


def lock(state_dir: Path) -> None:
    """Take the state folder for this process, or stop naming the process that has it."""
    path = Path(state_dir).with_name(Path(state_dir).name + ".lock")
    if path in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise DreampipeError(f"{state_dir}: another job (pid {holder}) is training this character with "
                             "this state; wait for it to end (or stop it), then run the same command "
                             "again") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[path] = f


def set_aside_if_unreadable(state_dir: Path, state_file: str) -> None:
    """A state file cut short (a full disk, a copy interrupted) fails every resume: move the folder
    to <state_dir>.unreadable, so that training starts fresh and the file is still there to inspect."""
    state_dir = Path(state_dir)
    path = state_dir / state_file
    problem = unreadable(path)
    if not problem:
        return
    aside = state_dir.with_name(state_dir.name + ".unreadable")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(state_dir, aside)
    log.warning("%s is unreadable (%s): moved it to %s (delete that when you no longer need it); "
                "starting fresh", path, problem, aside)


def unreadable(path: Path) -> str | None:
    """Why a saved state (a torch.save zip archive) cannot be loaded, or None. Reads only the zip
    directory, which is at the end of the file: a file cut short has none."""
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "no data.pkl in the archive"
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt: {e}"
    return None
