"""The workflow on a real single-node SLURM, through profiles/slurm and Snakemake's executor plugin.

The test starts its own cluster (munged, slurmctld, slurmd on localhost, as root), installing the
Debian packages when missing, and stops and removes it afterwards. The cluster has no accounting
database: the plugin follows jobs with squeue (--slurm-status-command squeue), which lists
finished jobs for MinJobAge seconds, so no slurmdbd or MySQL is needed.
"""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN = Path("/usr/sbin")
GPU_RULES = {"class_images", "train", "sample"}
RUN_TIMEOUT = 1200

SLURM_CONF = """\
ClusterName=dreampipe-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
SlurmUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue (the plugin's status command here) for the whole test
MinJobAge=3600
GresTypes=gpu
# The node claims what profiles/slurm asks for (8 CPUs, 64 GB, 2 GPUs backed by null devices);
# task/none enforces none of it, so the tiny jobs share what the machine has.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=65536 Gres=gpu:2 State=UNKNOWN
PartitionName=dreampipe Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

# What differs on this test cluster from a site's: no accounting (squeue instead of sacct), no
# accounts, and status checks every few seconds instead of every 40+ s.
CLUSTER_ARGS = ["--slurm-status-command", "squeue", "--slurm-no-account",
                "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2"]


def install_packages():
    if all((SBIN / d).exists() for d in ("munged", "slurmctld", "slurmd")) and shutil.which("sbatch"):
        return
    assert os.geteuid() == 0, f"the SLURM test installs {' '.join(PACKAGES)} with apt-get: run it as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                   check=True, stdout=subprocess.DEVNULL)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Slurm:
    """munged, slurmctld and slurmd with every file (config, state, logs, sockets) in `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def __call__(self, *cmd) -> str:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed: {r.stderr}{self.logs()}"
        return r.stdout

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}:\n" + "\n".join(p.read_text().splitlines()[-15:])
                       for p in sorted(self.root.glob("*.log")))

    def start(self):
        root = self.root
        (root / "state").mkdir()
        (root / "spool").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for i in range(2):
            os.mknod(root / f"gpu{i}", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        (root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={root}/gpu[0-1]\n")
        ctld_port, slurmd_port = free_ports(2)
        (root / "slurm.conf").write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, slurmd_port=slurmd_port))
        self(SBIN / "munged", f"--key-file={key}", f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
             f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed")
        self(SBIN / "slurmctld", "-f", root / "slurm.conf")
        # srun inside each job reads /etc/slurm/slurm.conf, as the plugin drops SLURM_CONF from its
        # environment: slurmd (and so every job) gets a private mount namespace where /etc/slurm is root.
        self("unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /etc/slurm && exec "$1" -f "$0/slurm.conf" -N localhost', root, SBIN / "slurmd")
        wait_for(lambda: self("sinfo", "--noheader", "--Node", "--format=%t").strip() == "idle", 60, "an idle node")

    def stop(self):
        if (self.root / "slurmctld.pid").exists():
            subprocess.run(["scancel", "--partition=dreampipe"], env=self.env, capture_output=True)
            wait_for(lambda: not any(j["JobState"] in ("RUNNING", "COMPLETING") for j in self.jobs()), 60,
                     "cancelled jobs to end")
        for daemon in ("slurmd", "slurmctld", "munged"):
            pidfile = self.root / f"{daemon}.pid"
            if pidfile.exists():
                pid = int(pidfile.read_text())
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, f"{daemon} to stop")

    def jobs(self) -> list[dict]:
        """Every job the cluster remembers, as `scontrol show job` fields."""
        out = self("scontrol", "--oneliner", "show", "job")
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]


@pytest.fixture(scope="module")
def slurm():
    install_packages()
    root = Path(tempfile.mkdtemp(prefix="dreampipe-slurm-"))
    root.chmod(0o755)  # munged wants its socket's folder open to all
    cluster = Slurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root)


def submit(workflow, slurm, log: Path) -> subprocess.Popen:
    """The documented cluster command, `snakemake --profile profiles/slurm`, in the background."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**slurm.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", *CLUSTER_ARGS],
                                cwd=workflow.path, env=env, stdout=f, stderr=subprocess.STDOUT)


def finish(run: subprocess.Popen, log: Path) -> str:
    run.wait(timeout=RUN_TIMEOUT)
    return log.read_text()


def rule_of(job: dict) -> tuple[str, str]:
    """(rule, wildcards) from the comment the plugin gives each job, e.g. rule_train_wildcards_bob."""
    rule, _, wildcards = job["Comment"].removeprefix("rule_").partition("_wildcards_")
    return rule, wildcards


def test_the_plugin_asks_sbatch_for_as_many_gpus_as_each_job_takes(workflow):
    """Fast, with no cluster: the `gpu` resource of every GPU job, train.devices included, reaches
    sbatch as --gpus=N, and the profile overrides it for no rule."""
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Job:
        def __init__(self, resources):
            self.resources = type("Resources", (dict,), {"__getattr__": dict.__getitem__})(resources)

    workflow.character("duo", train={"devices": 2})
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "profile.yaml").read_text())
    gpus = workflow.gpus(available=2)
    assert gpus["train", "duo"] == 2
    assert profile["set-resources"]["train"]["nodes"] == 1, "DDP's processes share one node"
    for (rule, _), n in gpus.items():
        resources = profile["set-resources"][rule]
        assert not {"gpu", "gres"} & set(resources), f"the profile overrides the GPUs of {rule}"
        assert set_gres_string(Job({**resources, "gpu": n})) == f" --gpus={n}"
        assert set_gres_string(Job({"gpu": n, "gpu_model": "a100"})) == f" --gpus=a100:{n}"


def test_two_characters_run_on_slurm_and_a_cancelled_training_resumes_on_the_same_command(workflow, slurm):
    workflow.character("alice")
    workflow.character("bob", token="sks", train={"max_steps": 20, "save_state_every_n_steps": 2})
    out = workflow.path / "results"

    log = workflow.path / "first.log"
    first = submit(workflow, slurm, log)

    def bob_training_with_state():
        assert first.poll() is None, f"snakemake ended before bob's training ran:\n{log.read_text()[-4000:]}"
        running = [j for j in slurm.jobs() if rule_of(j) == ("train", "bob") and j["JobState"] == "RUNNING"]
        return running and (out / "bob" / ".state" / "last.ckpt").exists() and running[0]["JobId"]

    bob_job = wait_for(bob_training_with_state, RUN_TIMEOUT, "bob's training to save its first state")
    slurm("scancel", bob_job)
    text = finish(first, log)
    assert first.returncode != 0, text[-4000:]
    assert f"SLURM-job '{bob_job}' failed, SLURM status is: 'CANCELLED'" in text
    assert (out / "alice" / "samples" / "final.png").exists(), "alice goes on while bob fails (keep-going)"
    assert not (out / "bob" / "train" / "model.safetensors").exists()
    assert (out / "bob" / ".state" / "last.ckpt").exists(), "the cancelled training left its state"

    log = workflow.path / "second.log"
    second = submit(workflow, slurm, log)
    text = finish(second, log)
    assert second.returncode == 0, text[-4000:]
    assert "resuming from" in (out / "bob" / "logs" / "train.log").read_text()
    for name in ("alice", "bob"):
        assert (out / name / f"{name}.safetensors").stat().st_size > 0
        assert (out / name / "samples" / "final.png").exists()
        assert (out / name / "settings.yaml").exists()
        assert not (out / name / ".state").exists()

    jobs = [j for j in slurm.jobs() if j["WorkDir"] == str(workflow.path)]
    rules = [rule_of(j)[0] for j in jobs]
    assert rules.count("class_images") == 1, "the class set both characters share is made once"
    assert rules.count("train") == 3, "alice once, bob cancelled and resubmitted"
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "profile.yaml").read_text())
    for job in jobs:
        rule = rule_of(job)[0]
        assert (job.get("TresPerJob") == "gres:gpu:1") == (rule in GPU_RULES), (rule, job.get("TresPerJob"))
        resources = {**profile["default-resources"], **profile["set-resources"].get(rule, {})}
        assert job["MinMemoryNode"] == f"{resources['mem_mb']}M", rule
        assert job["TimeLimit"] == f"{resources['runtime'] // 60:02d}:{resources['runtime'] % 60:02d}:00", rule
