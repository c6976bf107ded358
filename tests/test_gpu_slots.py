"""The GPU slot allocator: concurrent jobs never share a GPU; a killed job's GPU is freed; a job of
several GPUs takes them all at once."""

import json
import os
import signal
import subprocess
import sys

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


# ---- DDP on two GPUs, judged beside one GPU ------------------------------------------------------
# The yardstick is one GPU at DDP's global batch *and* arithmetic: batch 1 with 2 micro-batches
# accumulated, which on the CPU is DDP of two ranks bit for bit (tests/test_train.py). One GPU at
# batch 2 is not: on a GPU the UNet trains in bf16 with stochastic rounding, where bench/ddp_numerics.py
# (the GPU's arithmetic emulated on the CPU) finds batch 1 x 2 accumulated 0.49 of the distance
# moved away from batch 2 after 3 steps (fp32 on the CPU: 0.22; the CPU test's bound: 0.3), and a
# wrong global batch (batch 1) or one rank's gradients alone 1.0 away. GPU kernels are not
# deterministic (atomic adds), so two runs of one command differ too, and any difference in the
# last bit of one gradient ends 0.25-0.3 of the distance moved away after 3 steps (emulated): DDP
# must lie within 1.5x the distance of a rerun or 0.4, whichever is larger (0.4: where the GPU
# repeats itself to the bit but some sum in DDP's path is rounded otherwise), and at most half as
# far as the wrong global batch.
DDP_STEPS = 3
ONE_GPU_RUNS = {"accumulated": dict(batch_size=1, gradient_accumulation_steps=2),
                "rerun": dict(batch_size=1, gradient_accumulation_steps=2),
                "batch 1": dict(batch_size=1), "batch 2": dict(batch_size=2)}


@pytest.fixture(scope="module")
def one_gpu(tiny_model, tmp_path_factory):
    """The instance folder both DDP twins train on, and the one-GPU runs (ONE_GPU_RUNS) they are
    judged beside: trained weights by name. Each is the DDP twins' command with train.devices 1,
    so that nothing but DDP sets them apart; they share the two GPU slots, two at a time."""
    import torch
    from safetensors.torch import load_file

    from test_gpu import instance_folder

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    root = tmp_path_factory.mktemp("one-gpu")
    subjects = [(instance_folder(root / "instance", 64), None)]
    logs = {name: root / name.replace(" ", "-") / "train.log" for name in ONE_GPU_RUNS}
    procs = {name: launch(*command(tiny_model, subjects, logs[name].parent, **overrides), logs[name])
             for name, overrides in ONE_GPU_RUNS.items()}
    for name, proc in procs.items():
        assert proc.wait(timeout=600) == 0, f"one GPU, {name}: failed (exit {proc.returncode})\n{tails(logs[name])}"
    return subjects, {name: load_file(log.parent / "model.safetensors") for name, log in logs.items()}


def command(tiny_model, subjects, folder, **overrides) -> tuple[list[str], dict]:
    """The train CLI as the train rule runs it, DDP_STEPS steps, and its environment: gpu_slots
    takes the job's GPUs from the slots in folder/../locks (no CUDA_VISIBLE_DEVICES: the job
    chooses its own)."""
    import test_train

    cmd = test_train.train_command(tiny_model, subjects, folder, test_train.settings(max_steps=DDP_STEPS, **overrides))
    env = {**{k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DREAMPIPE_GPU_SLOTS_HELD")},
           "DREAMPIPE_GPU_SLOTS": str(folder.parent / "locks"), "PYTHONPATH": str(ROOT / "workflow")}
    return cmd, env


def launch(cmd: list[str], env: dict, log) -> subprocess.Popen:
    """The command with --log `log` (every rank's lines and tracebacks), its terminal output in
    `log`.out (a pipe nobody reads would stop it once full); in a session of its own, as DDP's
    second rank is its child: killpg ends both."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.with_suffix(".out").open("w") as out:
        return subprocess.Popen(cmd + ["--log", str(log)], env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def tails(*logs, lines: int = 15) -> str:
    """The last lines of each log and of its terminal output, for a failure message."""
    parts = []
    for path in [p for log in logs for p in (log, log.with_suffix(".out"))]:
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(none)"]
        parts.append(f"--- {path.name}:\n" + "\n".join(text))
    return "\n".join(parts)


def check_ddp_matches_one_gpu(tiny_model, ddp_model, runs: dict, *logs) -> None:
    """DDP's trained UNet no farther from one GPU at its global batch and arithmetic than the GPU's
    own reruns allow, and at most half as far as one GPU at the wrong global batch."""
    from safetensors.torch import load_file

    import test_train

    assert ddp_model.exists(), f"no model written by DDP\n{tails(*logs)}"
    reference, base = runs["accumulated"], load_file(tiny_model[0])
    moved = test_train.distance(reference, {k: v.to(reference[k].dtype) for k, v in base.items() if k in reference})
    share = {name: round(test_train.distance(weights, reference) / moved, 3)
             for name, weights in {"DDP": load_file(ddp_model), **runs}.items() if name != "accumulated"}
    bound = round(max(1.5 * share["rerun"], 0.4), 3)
    figures = (f"trained UNets against one GPU at batch 1 x 2 accumulated (DDP's global batch and arithmetic), as "
               f"shares of the distance it moved ({moved:.4g}): DDP {share['DDP']} (bound {bound}: 1.5 x a rerun's "
               f"{share['rerun']}, at least 0.4, and under half of batch 1's); one GPU at batch 1, the wrong global "
               f"batch: {share['batch 1']}; at batch 2: {share['batch 2']} (the GPU's arithmetic emulated on the CPU: "
               f"DDP 0, a rerun 0.25-0.3, batch 1 1.03, one rank's gradients alone 0.98, batch 2 0.49)")
    print(f"\nGPU ddp, {logs[-1].stem} run: {figures}", flush=True)  # for docs/benchmarks.md (pytest -s)
    assert share["DDP"] <= bound and share["DDP"] < 0.5 * share["batch 1"], f"{figures}\n{tails(*logs)}"


@pytest.mark.gpu
def test_ddp_on_two_gpus_takes_both_logs_every_rank_and_matches_one_gpu(tiny_model, one_gpu, tmp_path):
    """The CLI with train.devices 2, as the train rule runs it: both ranks see the two slots it took
    and log to --log, and the model lands where one GPU at the same global batch does (above)."""
    subjects, runs = one_gpu
    folder = tmp_path / "ddp"
    cmd, env = command(tiny_model, subjects, folder, batch_size=1, devices=2)
    log = folder / "train.log"
    proc = launch(cmd, env, log)
    assert proc.wait(timeout=600) == 0, f"DDP training failed (exit {proc.returncode})\n{tails(log)}"
    logged = log.read_text()
    using = [line for line in logged.splitlines() if "using GPU" in line]
    assert len(using) == 2 and any(" rank 1 dreampipe: using GPU 0,1" in line for line in using) and all(
        line.endswith("using GPU 0,1") for line in using), f"each rank logs the job's GPUs once: {using}\n{tails(log)}"
    check_ddp_matches_one_gpu(tiny_model, folder / "model.safetensors", runs, log)


@pytest.mark.gpu
def test_ddp_on_two_gpus_resumes_after_a_kill_and_matches_one_gpu(tiny_model, one_gpu, tmp_path):
    """GPU twin of the CPU test's kill and resume (tests/test_train.py, DDP on two CPU processes):
    both ranks killed after a state save, the same command resumes and lands where one GPU at the
    same global batch does (above)."""
    import test_train
    from dreampipe import train

    subjects, runs = one_gpu
    folder = tmp_path / "ddp"
    # The state of step 1 is on disk (written in the background) by the end of step 2; from there
    # the run lasts steps 2 and 3 (milliseconds with CUDA graphs), the final grid, whose 500 DDIM
    # steps of the tiny UNet take half a second or more on any GPU (eager: hundreds of kernel
    # launches a step), then the model, the plots, and the state's removal (the end of train.run).
    # The test looks every 10 ms: the kill lands after a state save and before the end.
    cmd, env = command(tiny_model, subjects, folder, batch_size=1, devices=2, save_state_every_n_steps=1,
                       sample_steps=500)
    killed, resumed = folder / "killed.log", folder / "resumed.log"
    proc = launch(cmd, env, killed)
    test_train.wait_for((folder / ".state" / train.STATE_FILE).exists, proc, every=0.01,
                        details=lambda: f"exit {proc.returncode}, no state saved\n{tails(killed)}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "model.safetensors").exists(), f"the kill came after the model was written\n{tails(killed)}"
    again = launch(cmd, env, resumed)
    assert again.wait(timeout=600) == 0, f"the resumed run failed (exit {again.returncode})\n{tails(killed, resumed)}"
    assert "resuming from" in resumed.read_text(), f"the second run started over\n{tails(killed, resumed)}"
    check_ddp_matches_one_gpu(tiny_model, folder / "model.safetensors", runs, killed, resumed)


def test_the_lock_folder_is_the_one_the_docs_name(monkeypatch):
    from dreampipe import gpu_slots

    monkeypatch.delenv("DREAMPIPE_GPU_SLOTS", raising=False)
    default = str(gpu_slots.lock_dir())
    assert default == "/tmp/dreampipe-gpu-slots"
    assert default in gpu_slots.__doc__ and f"`{default}/`" in (ROOT / "README.md").read_text()
    monkeypatch.setenv("DREAMPIPE_GPU_SLOTS", "/elsewhere")
    assert str(gpu_slots.lock_dir()) == "/elsewhere"
