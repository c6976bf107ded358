"""Deployment as Snakemake users deploy published workflows: as a module used from a folder that
holds only config/, with the software environments and container the workflow declares."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import ROOT, TINY_CONFIG

BIN = Path(sys.executable).parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def snakefile_min_version() -> str:
    return re.search(r'^min_version\("([\d.]+)"\)', (ROOT / "Snakefile").read_text(), re.M).group(1)


def test_the_workflow_runs_as_a_module_from_a_folder_with_only_config(tmp_path):
    """What snakedeploy writes, with the module's Snakefile a path to a copy of this checkout
    instead of github(...). Paths in the config are the user's: relative to their folder, or
    absolute. The parse and every job import the module's own package, whatever else is installed."""
    clone = tmp_path / "dreampipe"
    clone.mkdir()
    shutil.copy(ROOT / "Snakefile", clone)
    for name in ("workflow", "envs"):
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "imported-from"
    with (clone / "workflow" / "dreampipe" / "__init__.py").open("a") as f:
        f.write(f"\nwith open({str(marker)!r}, 'a') as _f:\n    _f.write(__file__ + '\\n')\n")
    user = tmp_path / "user"
    (user / "config" / "characters").mkdir(parents=True)
    config = {**TINY_CONFIG, "class_images": {"class_data": "none"},
              "train": {**TINY_CONFIG["train"], "max_steps": 2}}
    (user / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (user / "config" / "characters" / "example.yaml").write_text(yaml.safe_dump(
        {"instance_dir": str(ROOT / "example" / "photos"), "token": "zxq", "class_word": "star"}))
    (user / "workflow").mkdir()
    (user / "workflow" / "Snakefile").write_text(f'''\
from snakemake.utils import min_version

min_version("{snakefile_min_version()}")


configfile: "config/config.yaml"


module dreampipe:
    snakefile:
        "{clone / 'Snakefile'}"
    config:
        config


use rule * from dreampipe
''')
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PATH": f"{BIN}:{os.environ['PATH']}"}
    r = subprocess.run([BIN / "snakemake", "--cores", "1", "--resources", "gpu=1"], cwd=user, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    imported = set(marker.read_text().splitlines())
    assert imported == {str(clone / "workflow" / "dreampipe" / "__init__.py")}
    assert len(marker.read_text().splitlines()) > 4, "the parse and each job"
    out = user / "results" / "example"
    assert (out / "example.safetensors").stat().st_size > 0, "rule all is not the default target"
    assert (out / "samples" / "final.png").exists()
    r = subprocess.run([BIN / "snakemake", "--report", "results/report.html"], cwd=user, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "results/example/samples/final.png" in (user / "results" / "report.html").read_text()


def test_the_snakefile_checks_the_snakemake_version_pyproject_requires():
    [floor] = [d.split(">=")[1] for d in pyproject()["project"]["dependencies"] if d.startswith("snakemake>=")]
    assert snakefile_min_version() == floor


def test_profiles_use_the_file_name_snakemake_9_documents():
    from snakemake.cli import get_profile_dir

    for profile in (ROOT / "profiles").iterdir():
        assert sorted(p.name for p in profile.glob("*.yaml")) == ["profile.yaml"], profile
        assert get_profile_dir(str(profile))[1].name == "profile.yaml"
    # profile.yaml is read from Snakemake 9.19 on (older ones read only config.yaml)
    assert tuple(map(int, snakefile_min_version().split("."))) >= (9, 19)


# pyproject.toml's name of a runtime dependency -> its conda-forge name
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def test_the_conda_environment_holds_pyprojects_dependencies_from_conda_forge_only():
    """Conda itself is not on this machine: the file is checked against pyproject.toml, not solved.
    No pip part: a linux-64 pin file (conda's explicit format, conda packages only) then pins it whole."""
    env = yaml.safe_load((ROOT / "envs" / "dreampipe.yaml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    assert all(isinstance(d, str) for d in env["dependencies"]), "a pip part cannot be pinned"
    conda = dict(re.fullmatch(r"([\w.-]+)\s*(.*)", d).groups() for d in env["dependencies"])
    assert conda.pop("python") == pyproject()["project"]["requires-python"]
    assert conda.pop("imagemagick") == "", "wand needs ImageMagick's MagickWand, as the Makefile installs"
    wanted = {}
    for dep in pyproject()["project"]["dependencies"]:
        name, bound = re.fullmatch(r"([\w.-]+)(.*)", dep).groups()
        if name != "snakemake":  # schedules the jobs from outside the environment
            wanted[CONDA_NAMES.get(name, name.lower())] = bound
    assert conda == wanted


def test_the_container_is_what_make_venv_installs_and_the_snakefile_names_it():
    """Docker is not running on this machine: the Dockerfile is checked, not built."""
    version = pyproject()["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = " ".join(re.findall(r"^RUN (.*)", dockerfile, re.M))
    assert "make venv" in runs, "the Makefile's own target installs the image, so the two cannot drift"
    copied = " ".join(re.findall(r"^COPY (.*)", dockerfile, re.M))
    for needed in ("Makefile", "pyproject.toml", pyproject()["project"]["readme"], "workflow"):
        assert needed in copied.split(), needed
    image = f"dreampipe:{version}"
    assert re.search(rf'^container: "docker-daemon://{re.escape(image)}"$', (ROOT / "Snakefile").read_text(), re.M)
    dry = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"docker build -t {image} ." in dry
    dry = subprocess.run(["make", "-n", "venv", "VENV=/opt/venv", "TORCH=torch"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "libmagickwand" in dry and "/opt/venv/bin/pip install -q 'torch' -e ." in dry


def test_the_catalog_file_states_the_usage():
    catalog = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert "--resources gpu=1" in catalog["mandatory-flags"]["flags"]
    assert catalog["software-stack-deployment"] == {"conda": True, "apptainer": True, "apptainer+conda": False,
                                                    "report": True}
