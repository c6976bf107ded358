"""Shared fixtures: the tiny model (built once per session) and a runnable copy of the workflow."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))

# Small enough that a whole workflow run takes seconds per job on a CPU.
TINY_CONFIG = {
    "base_model": "tiny",
    "prepare": {"resolution": 64},
    "class_images": {"num_class_images": 3, "steps": 2},
    "train": {"max_steps": 4, "learning_rate": 1e-4, "sample_every_n_steps": 0, "sample_steps": 2,
              "save_state_every_n_steps": 2},
    "sample": {"steps": 2, "seeds": [0, 1], "prompts": ["{instance_prompt}"]},
}


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu (tests/test_gpu.py) are skipped where CUDA is absent, so CI stays green."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from dreampipe import tiny

    folder = tmp_path_factory.mktemp("tiny")
    model = tiny.build(folder / "tiny-sd.safetensors", folder / "tokenizer")
    return model, folder / "tokenizer"


@pytest.fixture(scope="session")
def example_photos(tmp_path_factory):
    from dreampipe import example_photos

    folder = tmp_path_factory.mktemp("photos")
    example_photos.write(folder)
    return folder


class Workflow:
    """A copy of the workflow in a temp dir (Snakemake locks its working directory)."""

    def __init__(self, path: Path):
        self.path = path
        for name in ("Snakefile", "workflow", "profiles", "envs", "example"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, path / name)
        (path / "config" / "characters").mkdir(parents=True)
        self.write_config(TINY_CONFIG)

    def write_config(self, data: dict):
        (self.path / "config" / "config.yaml").write_text(yaml.safe_dump(data))

    def character(self, name: str, **data):
        data.setdefault("instance_dir", "example/photos")
        data.setdefault("token", "zxq")
        data.setdefault("class_word", "robot")
        (self.path / "config" / "characters" / f"{name}.yaml").write_text(yaml.safe_dump(data))

    def snakemake(self, *args, check=True):
        cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "--resources", "gpu=1", *args]
        bin_dir = str(Path(sys.executable).parent)
        env = {**__import__("os").environ, "PATH": f"{bin_dir}:{__import__('os').environ['PATH']}"}
        r = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True, env=env)
        if check and r.returncode:
            raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        return r

    def planned(self) -> list[tuple[str, str]]:
        """(rule, character) of every job a dry run would execute."""
        out = self.snakemake("-n").stdout + self.snakemake("-n").stderr
        jobs, rule = [], None
        for line in out.splitlines():
            line = line.strip()
            if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
                rule = line.split()[1].rstrip(":")
                jobs.append([rule, ""])
            elif line.startswith("wildcards:") and jobs:
                jobs[-1][1] = line.split("character=")[-1].split(",")[0] if "character=" in line else ""
        return sorted((r, c) for r, c in jobs if r != "all")

    def gpus(self, available: int) -> dict[tuple[str, str], int]:
        """{(rule, character): the `gpu` resource} of every GPU job a dry run plans with `available` GPUs."""
        out = self.snakemake("-n", "--resources", f"gpu={available}").stdout
        jobs = {}
        for job in out.split("\nrule ")[1:]:
            character = re.search(r"character=(\w+)", job)
            if gpu := re.search(r"resources: .*\bgpu=(\d+)", job):
                jobs[job.split(":")[0], character[1] if character else ""] = int(gpu[1])
        return jobs


@pytest.fixture
def workflow(tmp_path):
    return Workflow(tmp_path)
