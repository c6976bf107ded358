"""The workflow passes Snakemake's linter and is formatted with snakefmt."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent


def test_snakemake_lint_reports_nothing():
    r = subprocess.run([BIN / "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr


def test_rules_are_formatted_with_snakefmt():
    r = subprocess.run([BIN / "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
