"""A workflow job ends when its Snakemake ends, however Snakemake ended.

Snakemake killed with SIGKILL cannot stop its jobs, and the kernel does not either: the job runs
on as an orphan and races the rerun for the same files. Snakemake runs a rule through
`bash -c`, so a job's process is a grandchild of Snakemake. The Snakefile exports Snakemake's
pid as DREAMPIPE_SNAKEMAKE_PID (`own_jobs`); a job that finds that pid among its ancestors asks
for SIGTERM when its shell dies (the parent-death signal, which watches the parent only) and
watches the Snakemake process itself. When it ends, the job gets SIGTERM (training then saves
its state), and SIGKILL after GRACE_SECONDS. A dreampipe command run by hand (nohup included)
is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

ENV = "DREAMPIPE_SNAKEMAKE_PID"
GRACE_SECONDS = 120  # enough to write an SD-size training state
POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("dreampipe")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, start time) of a process, None once it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _ancestors() -> dict[int, int]:
    """{pid: start time} of this process's parent, its parent, and so on."""
    chain, pid = {}, os.getppid()
    while pid > 1 and (stat := _stat(pid)):
        chain[pid] = stat[2]
        pid = stat[0]
    return chain


def own_jobs() -> None:
    """Called by the Snakefile: the jobs of this Snakemake will end with it."""
    os.environ[ENV] = str(os.getpid())


def end_with_workflow() -> None:
    """Under a Snakemake that exported its pid: end this process when that Snakemake ends."""
    owner, parent, ancestors = int(os.environ.get(ENV, 0)), os.getppid(), _ancestors()
    if owner not in ancestors:
        return
    if parent != owner:  # the shell between: its death is signalled by the kernel
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch, args=(owner, ancestors[owner]), daemon=True, name="end-with-workflow").start()


def _watch(owner: int, started: int) -> None:
    while (stat := _stat(owner)) and stat[1] not in "ZX" and stat[2] == started:
        time.sleep(POLL_SECONDS)
    log.warning("Snakemake (pid %d) ended: stopping this job", owner)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
