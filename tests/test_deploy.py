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


def workflow_copy(folder: Path, marker: Path) -> Path:
    """What a release of the workflow holds, its package noting each import of it in `marker`."""
    folder.mkdir()
    shutil.copy(ROOT / "Snakefile", folder)
    for name in ("workflow", "envs"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    with (folder / "workflow" / "dreampipe" / "__init__.py").open("a") as f:
        f.write(f"\nwith open({str(marker)!r}, 'a') as _f:\n    _f.write(__file__ + '\\n')\n")
    return folder


def deployment(folder: Path, module_snakefile: str) -> Path:
    """A user's folder as `snakedeploy deploy-workflow` leaves it: config/, profiles/ and a
    workflow/Snakefile using the workflow as a module. Its config's paths are the user's."""
    (folder / "config" / "characters").mkdir(parents=True)
    config = {**TINY_CONFIG, "class_images": {"class_data": "none"},
              "train": {**TINY_CONFIG["train"], "max_steps": 2}}
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "config" / "characters" / "example.yaml").write_text(yaml.safe_dump(
        {"instance_dir": str(ROOT / "example" / "photos"), "token": "zxq", "class_word": "star"}))
    shutil.copytree(ROOT / "profiles", folder / "profiles")
    (folder / "workflow").mkdir()
    (folder / "workflow" / "Snakefile").write_text(f'''\
from snakemake.utils import min_version

min_version("{snakefile_min_version()}")


configfile: "config/config.yaml"


module dreampipe:
    snakefile:
        {module_snakefile}
    config:
        config


use rule * from dreampipe
''')
    return folder


def snakemake(folder: Path, *args, **env) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it: no PYTHONPATH pointing at this checkout."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PATH": f"{BIN}:{os.environ['PATH']}",
           **env}
    r = subprocess.run([BIN / "snakemake", "--cores", "1", "--resources", "gpu=1", *args], cwd=folder, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def git(*args, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_github_module_as_snakedeploy_writes_it_runs_the_demo_on_its_own_package(tmp_path):
    """snakedeploy's github(...) module, offline: Snakemake's clone of the repository is put in its
    source cache beforehand (it fetches nothing while the tag is there). The parse and every job
    import the package of the release the module names, not this checkout's nor an installed one."""
    marker = tmp_path / "imported-from"
    release = workflow_copy(tmp_path / "dreampipe", marker)
    git("init", "-q", cwd=release)
    git("add", "-A", cwd=release)
    git("commit", "-qm", "release", cwd=release)
    git("tag", "v0.1.0", cwd=release)
    commit = git("rev-parse", "HEAD", cwd=release)
    cache = tmp_path / "cache"
    clone = cache / "snakemake" / "snakemake" / "source-cache" / "snakemake-git-cache" / "github.com" / "someone"
    git("clone", "-q", "--bare", str(release), str(clone / "dreampipe"), cwd=tmp_path)
    user = deployment(tmp_path / "user", 'github("someone/dreampipe", path="Snakefile", tag="v0.1.0")')

    snakemake(user, XDG_CACHE_HOME=str(cache))
    package = user / ".snakemake" / "dreampipe" / commit / "workflow" / "dreampipe"
    imports = marker.read_text().splitlines()
    assert set(imports) == {str(package / "__init__.py")} and len(imports) > 4, "the parse and each job"
    out = user / "results" / "example"
    assert (out / "example.safetensors").stat().st_size > 0, "rule all is not the default target"
    assert (out / "samples" / "final.png").exists()
    snakemake(user, "--report", "results/report.html", XDG_CACHE_HOME=str(cache))
    assert "results/example/samples/final.png" in (user / "results" / "report.html").read_text()


def test_a_module_given_by_path_parses_with_its_own_package(tmp_path):
    marker = tmp_path / "imported-from"
    release = workflow_copy(tmp_path / "dreampipe", marker)
    user = deployment(tmp_path / "user", repr(str(release / "Snakefile")))
    assert "train" in snakemake(user, "-n").stdout
    assert set(marker.read_text().splitlines()) == {str(release / "workflow" / "dreampipe" / "__init__.py")}


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
    context = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("Makefile", "pyproject.toml", pyproject()["project"]["readme"], "workflow"):
        assert needed in copied.split() and f"!{needed}" in context, needed
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
