"""A hard kill (SIGKILL of Snakemake, a truncated state file) needs no hand repair: jobs end with
their Snakemake, two jobs never write the same state, and the rerun says what it does."""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreampipe import cli, config, prepare

ROOT = Path(__file__).resolve().parent.parent


def processes(cwd: Path, text: str) -> list[int]:
    """Pids of the processes (not shells) working in `cwd` whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == cwd
                    and (proc / "comm").read_text().strip() not in ("bash", "sh")
                    and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def command(*args) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args, "--cores", "1", "--resources", "gpu=1"]


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def wait_until(condition, timeout, what):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only")
def test_jobs_end_when_snakemake_is_killed_and_the_documented_rerun_resumes(workflow):
    workflow.character("alice", class_images={"class_data": "none"},
                       train={"max_steps": 60, "save_state_every_n_steps": 5})
    state = workflow.path / "results" / "alice" / ".state"
    snakemake = subprocess.Popen(command(), cwd=workflow.path, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (state / "last.ckpt").exists() or snakemake.poll() is not None, 300, "training")
        assert snakemake.poll() is None, "the workflow ended before it could be killed"
        [trainer] = processes(workflow.path, "train --model")
        snakemake.kill()
        snakemake.wait()
        wait_until(lambda: not alive(trainer), 30, f"the orphaned trainer (pid {trainer}) to end")
    finally:  # nothing of this test outlives it, even when it fails
        for pid in [snakemake.pid] * (snakemake.poll() is None) + processes(workflow.path, "train --model"):
            os.kill(pid, signal.SIGKILL)

    # what the README says to do after a hard kill: Snakemake names --unlock, then the same command
    locked = subprocess.run(command(), cwd=workflow.path, env=ENV, capture_output=True, text=True)
    assert locked.returncode != 0 and "--unlock" in locked.stderr
    subprocess.run(command("--unlock"), cwd=workflow.path, env=ENV, check=True, capture_output=True)
    rerun = subprocess.run(command("results/alice/train/model.safetensors"), cwd=workflow.path, env=ENV,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (workflow.path / "results" / "alice" / "logs" / "train.log").read_text()
    assert "resuming from" in log


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only")
@pytest.mark.parametrize("under_snakemake", [True, False])
def test_a_job_ends_when_its_shell_dies_only_under_snakemake(under_snakemake):
    """This test stands in for Snakemake; the job waits. Run by hand (nohup), it outlives its shell."""
    job = "from dreampipe import lifetime; lifetime.end_with_workflow(); print('ready', flush=True); " \
          "import time; time.sleep(60)"
    env = {**ENV, "PYTHONPATH": str(ROOT / "workflow")}
    if under_snakemake:
        env["DREAMPIPE_SNAKEMAKE_PID"] = str(os.getpid())
    shell = subprocess.Popen(["bash", "-c", f"set -euo pipefail; {sys.executable} -c {shlex.quote(job)}; true"],
                             env=env, stdout=subprocess.PIPE, text=True)
    assert shell.stdout.readline().strip() == "ready"
    [child] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and alive(int(p.name))
               and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(shell.pid)]
    shell.kill()
    shell.wait()
    try:
        if under_snakemake:
            wait_until(lambda: not alive(child), 10, "the job to end with its shell")
        else:
            time.sleep(2)
            assert alive(child), "a command run by hand was stopped"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


# ---- the training state ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instance(example_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("instance") / "instance"
    prepare.run(example_photos, out, 64, "pad", "white", "a photo of zxq robot")
    return out


def train_args(tiny_model, instance, folder: Path, **overrides) -> list[str]:
    model, tokenizer = tiny_model
    settings = {**config.defaults()["train"], "resolution": 64, "max_steps": 4, "learning_rate": 1e-4,
                "sample_every_n_steps": 0, "save_state_every_n_steps": 2, **overrides}
    return ["train", "--model", str(model), "--tokenizer", str(tokenizer), "--instance-dir", str(instance),
            "--settings", json.dumps(settings), "--state", str(folder / ".state"),
            "--workdir", str(folder / "train"), "--out", str(folder / "model.safetensors")]


def test_a_second_trainer_on_the_same_state_stops_with_one_line_naming_the_first(tiny_model, instance, tmp_path,
                                                                                  caplog):
    args = train_args(tiny_model, instance, tmp_path, max_steps=2000)
    first = subprocess.Popen([sys.executable, "-m", "dreampipe.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**ENV, "PYTHONPATH": str(ROOT / "workflow")})
    try:
        wait_until(lambda: (tmp_path / ".state" / "last.ckpt").exists(), 300, "the first trainer")
        # other settings, as after an edit of the character file: it would start fresh, deleting the state
        assert cli.main(train_args(tiny_model, instance, tmp_path)) == 1
        [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert f"another job (pid {first.pid}) is training" in error and str(tmp_path / ".state") in error
        assert first.poll() is None, "the first trainer goes on"
        assert (tmp_path / ".state" / "last.ckpt").exists(), "and keeps its state"
    finally:
        first.kill()
        first.wait()


def test_a_truncated_state_is_set_aside_and_training_starts_fresh_saying_so(tiny_model, instance, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    args = train_args(tiny_model, instance, tmp_path, keep_state=True)
    assert cli.main(args) == 0
    state = tmp_path / ".state" / "last.ckpt"
    whole = state.read_bytes()
    state.write_bytes(whole[:len(whole) // 2])

    caplog.clear()
    assert cli.main(args) == 0
    aside = tmp_path / ".state.unreadable" / "last.ckpt"
    assert aside.read_bytes() == whole[:len(whole) // 2], "the broken state is kept, not deleted"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(state) in warning and str(aside.parent) in warning and "starting fresh" in warning
    assert "resuming" not in caplog.text
    assert state.exists(), "the fresh run saved a state of its own"
