"""The GPU slot allocator: concurrent jobs never share a GPU; a killed job's GPU is freed; a job of
several GPUs takes them all at once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

HOLD = """
import os, sys, time
sys.path.insert(0, {pkg!r})
from dreampipe import gpu_slots
slots = gpu_slots.acquire({locks!r}, {want!r}, count={count}, poll=0.05)
taken = ",".join(map(str, slots))
with open({log!r}, "a") as f:
    f.write(f"start {{taken}} {{os.environ['CUDA_VISIBLE_DEVICES']}} {{time.time()}}\\n")
time.sleep({hold})
with open({log!r}, "a") as f:
    f.write(f"end {{taken}} {{time.time()}}\\n")
"""


def holder(tmp_path, count, hold, want=1):
    code = HOLD.format(pkg=str(ROOT / "workflow"), locks=str(tmp_path / "locks"), count=count,
                       log=str(tmp_path / "log"), hold=hold, want=want)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DREAMPIPE_GPU_SLOTS_HELD")}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def no_slots_held(monkeypatch):
    """An environment without CUDA_VISIBLE_DEVICES nor held slots, restored after the test."""
    from dreampipe import gpu_slots

    for name in ("CUDA_VISIBLE_DEVICES", gpu_slots.HELD):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def check_no_slot_shared(tmp_path, jobs: int, count: int):
    events = []
    for line in (tmp_path / "log").read_text().splitlines():
        kind, slots, *rest = line.split()
        if kind == "start":
            assert rest[0] == slots, "CUDA_VISIBLE_DEVICES names the slots"
        events += [(float(rest[-1]), kind, int(slot)) for slot in slots.split(",")]
    assert len({(t, kind) for t, kind, _ in events if kind == "start"}) == jobs
    busy = dict.fromkeys(range(count), 0)
    for _, kind, slot in sorted(events, key=lambda e: (e[0], e[1] == "start")):
        busy[slot] += 1 if kind == "start" else -1
        assert busy[slot] <= 1, f"slot {slot} given to two jobs at once"


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    jobs = [holder(tmp_path, count=2, hold=0.6) for _ in range(5)]
    assert all(j.wait(timeout=60) == 0 for j in jobs)
    check_no_slot_shared(tmp_path, jobs=5, count=2)


def test_jobs_of_several_gpus_take_them_all_at_once_and_never_deadlock(tmp_path):
    """Jobs of 2 slots and of 1 on 3 GPUs: each 2-slot job sees both of its GPUs; none waits
    forever holding one slot while another holds the rest."""
    jobs = [holder(tmp_path, count=3, hold=0.4, want=w) for w in (2, 2, 1, 2, 1, 2)]
    assert all(j.wait(timeout=60) == 0 for j in jobs)
    check_no_slot_shared(tmp_path, jobs=6, count=3)
    starts = [line.split()[1] for line in (tmp_path / "log").read_text().splitlines() if line.startswith("start")]
    assert sorted(len(s.split(",")) for s in starts) == [1, 1, 2, 2, 2, 2]


def test_a_list_of_devices_takes_those_gpus(tmp_path):
    first = holder(tmp_path, count=4, hold=0, want=[1, 3])
    assert first.wait(timeout=30) == 0
    assert (tmp_path / "log").read_text().startswith("start 1,3 1,3 ")


def test_a_ddp_rank_uses_the_slots_its_job_holds_without_taking_more(tmp_path, monkeypatch):
    """DDP starts ranks 1.. by running the command again, in the environment of rank 0."""
    from dreampipe import gpu_slots

    no_slots_held(monkeypatch)
    assert gpu_slots.acquire(tmp_path, 2, count=2) == [0, 1]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert gpu_slots.acquire(tmp_path, 2, count=2, poll=600) == [0, 1], "the rank does not wait on its own job"


def test_more_gpus_than_the_host_has_is_one_clear_error(tmp_path, monkeypatch):
    from dreampipe import gpu_slots
    from dreampipe.errors import DreampipeError

    no_slots_held(monkeypatch)
    with pytest.raises(DreampipeError, match=r"train.devices asks for 3 GPUs; this host has 2"):
        gpu_slots.acquire(tmp_path, 3, count=2)
    with pytest.raises(DreampipeError, match=r"train.devices names GPU 2; this host has 2 \(0 to 1\)"):
        gpu_slots.acquire(tmp_path, [0, 2], count=2)


def test_training_on_a_list_of_gpus_trains_on_those_it_took(tmp_path, monkeypatch):
    """train.devices [1, 3] on a host of 4 GPUs: slots 1 and 3, which the job sees as its GPUs 0 and 1."""
    from dreampipe import cli, train

    no_slots_held(monkeypatch)
    monkeypatch.setenv("DREAMPIPE_GPUS", "4")
    monkeypatch.setenv("DREAMPIPE_GPU_SLOTS", str(tmp_path / "locks"))
    seen = {}
    monkeypatch.setattr(train, "run", lambda *args, **kw: seen.update(
        devices=args[3]["devices"], visible=os.environ["CUDA_VISIBLE_DEVICES"]))
    assert cli.main(["train", "--model", "m", "--instance-dir", "i", "--settings", json.dumps({"devices": [1, 3]}),
                     "--state", "s", "--workdir", "w", "--out", "o"]) == 0
    assert seen == {"devices": 2, "visible": "1,3"}


@pytest.mark.parametrize("devices, visible, gpus", [
    (2, None, 2), ([0, 3], None, 2), ("auto", None, 1), ("auto", "0,1,2", 3), (1, "0,1,2", 1)])
def test_a_job_takes_as_many_gpus_as_train_devices_names(devices, visible, gpus, monkeypatch):
    """`auto` is one GPU slot under Snakemake, or every GPU of a CUDA_VISIBLE_DEVICES you set."""
    from dreampipe import gpu_slots

    no_slots_held(monkeypatch)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_slots.needed(devices) == gpus


def test_the_train_rule_asks_snakemake_for_train_devices_gpus(workflow):
    workflow.character("duo", train={"devices": 2})
    workflow.character("solo")
    gpus = workflow.gpus(available=4)
    assert gpus["train", "duo"] == 2
    assert gpus["train", "solo"] == 1
    assert gpus["sample", "duo"] == 1


@pytest.mark.gpu
def test_ddp_on_two_gpus_takes_both_logs_every_rank_and_matches_one_gpu(tiny_model, tmp_path):
    """The CLI with train.devices 2, as the train rule runs it: both ranks see the two slots it took
    and log to --log, and the model lands within the CPU test's bound of one GPU at the same
    global batch (tests/test_train.py, DDP on two CPU processes)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from safetensors.torch import load_file

    import test_train
    from test_gpu import instance_folder

    subjects = [(instance_folder(tmp_path / "instance", 64), None)]
    single = test_train.run(tiny_model, subjects, tmp_path / "single", max_steps=3, batch_size=2)
    folder = tmp_path / "ddp"
    log = folder / "train.log"
    cmd = test_train.train_command(tiny_model, subjects, folder,
                                   test_train.settings(max_steps=3, batch_size=1, devices=2)) + ["--log", str(log)]
    env = {**{k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DREAMPIPE_GPU_SLOTS_HELD")},
           "DREAMPIPE_GPU_SLOTS": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT / "workflow")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = log.read_text()
    assert logged.count("using GPU 0,1") == 2 and " rank 1 dreampipe: using GPU 0,1" in logged, logged
    moved = test_train.distance(single, load_file(tiny_model[0]))
    assert test_train.distance(load_file(folder / "model.safetensors"), single) < 0.3 * moved


@pytest.mark.gpu
def test_ddp_on_two_gpus_resumes_after_a_kill_and_matches_one_gpu(tiny_model, tmp_path):
    """GPU twin of the CPU test's kill and resume (tests/test_train.py, DDP on two CPU processes):
    both ranks killed after a state save, the same command resumes and lands within the CPU test's
    bound of one GPU at the same global batch."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from safetensors.torch import load_file

    import test_train
    from test_gpu import instance_folder

    subjects = [(instance_folder(tmp_path / "instance", 64), None)]
    # 3 steps as the CPU test: runs that differ only in rounding drift apart with more (tiny model,
    # CPU: 0.22 of the distance moved after 3 steps, 0.72 after 10); the final grid's 300 sampling
    # steps keep the run alive after the last state save, so the kill lands before the end
    single = test_train.run(tiny_model, subjects, tmp_path / "single", max_steps=3, batch_size=2)
    folder = tmp_path / "ddp"
    cmd = test_train.train_command(tiny_model, subjects, folder, test_train.settings(
        max_steps=3, batch_size=1, devices=2, save_state_every_n_steps=1, sample_steps=300))
    cmd += ["--log", str(folder / "train.log")]
    env = {**{k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DREAMPIPE_GPU_SLOTS_HELD")},
           "DREAMPIPE_GPU_SLOTS": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # DDP starts a second process: kill the group
    test_train.wait_for(lambda: (folder / ".state" / "last.ckpt").exists(), proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (folder / "model.safetensors").exists(), "killed before the end"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    moved = test_train.distance(single, load_file(tiny_model[0]))
    assert test_train.distance(load_file(folder / "model.safetensors"), single) < 0.3 * moved


def test_the_lock_folder_is_the_one_the_docs_name(monkeypatch):
    from dreampipe import gpu_slots

    monkeypatch.delenv("DREAMPIPE_GPU_SLOTS", raising=False)
    default = str(gpu_slots.lock_dir())
    assert default == "/tmp/dreampipe-gpu-slots"
    assert default in gpu_slots.__doc__ and f"`{default}/`" in (ROOT / "README.md").read_text()
    monkeypatch.setenv("DREAMPIPE_GPU_SLOTS", "/elsewhere")
    assert str(gpu_slots.lock_dir()) == "/elsewhere"
