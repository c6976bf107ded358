"""One GPU per job: Snakemake's `gpu` resource is only a counter and never says which GPU a job
gets (snakemake issue #281). Each GPU job takes the first free slot by holding an exclusive
flock on <i>.lock in /tmp/dreampipe-gpu-slots (DREAMPIPE_GPU_SLOTS moves it; one folder per host,
so that jobs of different workflows on the host share it) for its lifetime and sees only that GPU
through CUDA_VISIBLE_DEVICES. The kernel drops the lock when the process ends in any way (success,
failure, SIGKILL), so a slot can never leak and never be handed to two jobs at once."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

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


def acquire(lock_dir: Path, count: int | None = None, poll: float = 0.5) -> int | None:
    """Take a free GPU slot (waiting for one), set CUDA_VISIBLE_DEVICES, return its index.
    None where there is no GPU or the user already chose devices."""
    count = gpu_count() if count is None else count
    if count == 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(count):
            f = open(lock_dir / f"{slot}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _held.append(f)
            os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
            return slot
        time.sleep(poll)
