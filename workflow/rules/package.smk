# Where the workflow's own Python package is: first on sys.path for the parse, and on the jobs'
# PATH (workflow/bin/dreampipe) and PYTHONPATH, so that both run this workflow's code whatever
# else is installed (--sdm conda and apptainer provide the dependencies only).
import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path


def package_folder(source) -> Path:
    """The workflow/ folder of this workflow. Beside the Snakefile of a clone or of a module given
    by path; for a github() module (what snakedeploy writes), checked out of Snakemake's own clone
    of the repository, at the module's commit, into .snakemake/dreampipe/<commit>/."""
    if source.is_local:
        return Path(source).parent
    try:
        git_dir = source.hosted_repo.repo_clone
    except AttributeError:
        sys.exit(
            f"dreampipe: error: the module's snakefile {source} is neither a local path nor "
            "github()/gitlab(); clone the repository and give the path of its Snakefile"
        )
    git = ["git", "--git-dir", str(git_dir)]
    commit = subprocess.run(
        [*git, "rev-parse", f"{source.ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = Path.cwd() / ".snakemake" / "dreampipe" / commit
    if not dest.is_dir():
        archive = subprocess.run(
            [*git, "archive", commit, "workflow"], capture_output=True, check=True
        ).stdout
        tmp = dest.with_name(f"{commit}.{os.getpid()}.tmp")
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        # atomic: a concurrent parse may have won, with the same files
        try:
            tmp.rename(dest)
        except OSError:
            shutil.rmtree(tmp)
    return dest / "workflow"


PACKAGE = package_folder(workflow.current_basedir)
sys.path.insert(0, str(PACKAGE))
for var, folder in (("PATH", PACKAGE / "bin"), ("PYTHONPATH", PACKAGE)):
    os.environ[var] = os.pathsep.join(filter(None, [str(folder), os.environ.get(var)]))
