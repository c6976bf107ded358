"""GPUs per job: Snakemake's `gpu` resource is only a counter and never says which GPUs a job gets
(snakemake issue #281). Each GPU job takes free slots itself by holding an exclusive flock on
<i>.lock in /tmp/dreampipe-gpu-slots (DREAMPIPE_GPU_SLOTS moves it; one folder per host, so that
jobs of different workflows on the host share it) for its lifetime and sees only those GPUs through
CUDA_VISIBLE_DEVICES. A job of several GPUs (train.devices) takes them all at once or none, so two
jobs never wait on each other each holding a part. The kernel drops the locks when the process ends
in any way (success, failure, SIGKILL), so a slot can never leak and never be handed to two jobs at
once. DDP's other ranks, started by the job, use the job's slots (named in DREAMPIPE_GPU_SLOTS_HELD)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

from .errors import DreampipeError

HELD = "DREAMPIPE_GPU_SLOTS_HELD"
_held = []  # keeps the lock files open (and so locked) until the process exits


def lock_dir() -> Path:
    return Path(os.environ.get("DREAMPIPE_GPU_SLOTS", "/tmp/dreampipe-gpu-slots"))


def gpu_count() -> int:
    """GPUs of this host, without importing torch (DREAMPIPE_GPUS overrides, for tests)."""
    if "DREAMPIPE_GPUS" in os.environ:
        return int(os.environ["DREAMPIPE_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def needed(devices) -> int:
    """GPUs a job training on train.devices takes: a count, a list of indexes (one each), or auto:
    one slot, or every GPU of a CUDA_VISIBLE_DEVICES the user set (then no slots are taken)."""
    if devices == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    return len(devices) if isinstance(devices, list) else int(devices)


def _try_lock(lock_dir: Path, slot: int):
    f = open(lock_dir / f"{slot}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def acquire(lock_dir: Path, want: int | list[int] | str = 1, count: int | None = None,
            poll: float = 0.5) -> list[int] | None:
    """Take GPU slots (waiting until they are free), set CUDA_VISIBLE_DEVICES to them and return
    them. `want` is train.devices: a count of any free slots, a list of those slots (indexes of the
    host's GPUs), or auto (one). None where there is no GPU or the user already chose devices."""
    if os.environ.get(HELD):  # a DDP rank started by a job that holds its slots
        return [int(s) for s in os.environ[HELD].split(",")]
    count = gpu_count() if count is None else count
    if count == 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    n = needed(want)
    if n > count:
        raise DreampipeError(f"train.devices asks for {n} GPUs; this host has {count}: "
                             f"lower train.devices in the character file")
    wanted = sorted(want) if isinstance(want, list) else range(count)
    if any(i >= count for i in wanted):
        raise DreampipeError(f"train.devices names GPU {max(wanted)}; this host has {count} (0 to {count - 1}): "
                             "fix train.devices in the character file")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        # all or nothing, in ascending order: a job short of slots lets go of those it took
        taken = {}
        for slot in wanted:
            if f := _try_lock(lock_dir, slot):
                taken[slot] = f
                if len(taken) == n:
                    break
            elif isinstance(want, list):
                break
        if len(taken) == n:
            break
        for f in taken.values():
            f.close()
        time.sleep(poll)
    for f in taken.values():
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    _held.extend(taken.values())
    slots = list(taken)
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[HELD] = ",".join(map(str, slots))
    return slots
