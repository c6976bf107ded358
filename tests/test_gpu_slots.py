"""The GPU slot allocator: concurrent jobs never share a GPU; a killed job's GPU is freed."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

HOLD = """
import os, sys, time
sys.path.insert(0, {pkg!r})
from dreampipe import gpu_slots
slot = gpu_slots.acquire({locks!r}, count={count}, poll=0.05)
with open({log!r}, "a") as f:
    f.write(f"start {{slot}} {{os.environ['CUDA_VISIBLE_DEVICES']}} {{time.time()}}\\n")
time.sleep({hold})
with open({log!r}, "a") as f:
    f.write(f"end {{slot}} {{time.time()}}\\n")
"""


def holder(tmp_path, count, hold):
    code = HOLD.format(pkg=str(ROOT / "workflow"), locks=str(tmp_path / "locks"), count=count,
                       log=str(tmp_path / "log"), hold=hold)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    jobs = [holder(tmp_path, count=2, hold=0.6) for _ in range(5)]
    assert all(j.wait(timeout=60) == 0 for j in jobs)
    events = []
    for line in (tmp_path / "log").read_text().splitlines():
        kind, slot, *rest = line.split()
        if kind == "start":
            assert rest[0] == slot, "CUDA_VISIBLE_DEVICES names the slot"
        events.append((float(rest[-1]), kind, int(slot)))
    assert sum(kind == "start" for _, kind, _ in events) == 5
    busy = {0: 0, 1: 0}
    for _, kind, slot in sorted(events, key=lambda e: (e[0], e[1] == "start")):
        busy[slot] += 1 if kind == "start" else -1
        assert busy[slot] <= 1, f"slot {slot} given to two jobs at once"


def test_a_killed_jobs_slot_is_freed(tmp_path):
    stuck = holder(tmp_path, count=1, hold=600)
    deadline = time.time() + 30
    while not (tmp_path / "log").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert "start 0" in (tmp_path / "log").read_text()
    stuck.send_signal(signal.SIGKILL)
    stuck.wait()
    follower = holder(tmp_path, count=1, hold=0)
    assert follower.wait(timeout=30) == 0
    assert (tmp_path / "log").read_text().count("start 0") == 2


def test_no_gpu_means_no_slot(tmp_path, monkeypatch):
    from dreampipe import gpu_slots

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots.acquire(tmp_path, count=0) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_the_lock_folder_is_the_one_the_docs_name(monkeypatch):
    from dreampipe import gpu_slots

    monkeypatch.delenv("DREAMPIPE_GPU_SLOTS", raising=False)
    default = str(gpu_slots.lock_dir())
    assert default == "/tmp/dreampipe-gpu-slots"
    assert default in gpu_slots.__doc__ and f"`{default}/`" in (ROOT / "README.md").read_text()
    monkeypatch.setenv("DREAMPIPE_GPU_SLOTS", "/elsewhere")
    assert str(gpu_slots.lock_dir()) == "/elsewhere"
