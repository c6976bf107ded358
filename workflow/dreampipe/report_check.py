"""Look at a Snakemake report the way a person would: every image in it must decode, match its
file under results/, and display in headless Chromium; a screenshot of the report's first page
is written for a human look.

    snakemake --report results/report.html && dreampipe check-report results/report.html
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from .errors import DreampipeError

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def report_items(report: Path) -> dict:
    match = re.search(r"var results = (\{.*?\});\n", report.read_text(), re.S)
    if not match:
        raise DreampipeError(f"{report}: no results found; was it made by `snakemake --report`?")
    return json.loads(match.group(1))


def decoded(item: dict) -> bytes:
    return base64.b64decode(item["data_uri"].split("base64,", 1)[1])


def check_files(report: Path, root: Path) -> list[str]:
    """Problems with the embedded images: undecodable, or different from the file on disk."""
    problems = []
    for path, item in report_items(report).items():
        if not item["mime_type"].startswith("image/"):
            continue
        data = decoded(item)
        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception as e:
            problems.append(f"{path}: does not decode ({e})")
        if not (root / path).is_file() or (root / path).read_bytes() != data:
            problems.append(f"{path}: missing or different on disk")
    return problems


def check_display(report: Path, chromium: str, out: Path) -> list[str]:
    """Each image shown in Chromium must have a size; returns the ones that do not display."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, item in report_items(report).items():
            if not item["mime_type"].startswith("image/"):
                continue
            page = Path(tmp) / "img.html"
            page.write_text(f'<img id="i" src="{item["data_uri"]}" onload="document.title='
                            f"'shown '+this.naturalWidth+'x'+this.naturalHeight\">")
            dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile",
                                  "--dump-dom", page.as_uri()], capture_output=True, text=True,
                                 timeout=120).stdout
            shown = re.search(r"<title>shown (\d+)x(\d+)</title>", dom)
            if not shown or shown.group(1) == "0":
                problems.append(f"{path}: does not display in Chromium")
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile",
                        "--window-size=1400,1000", f"--screenshot={out / 'report.png'}",
                        "--virtual-time-budget=5000", report.resolve().as_uri()],
                       capture_output=True, timeout=120)
    return problems


def run(report: Path, out: Path, root: Path = Path(".")) -> list[str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise DreampipeError("chromium not found: apt-get install -y chromium")
    out.mkdir(parents=True, exist_ok=True)
    return check_files(report, root) + check_display(report, chromium, out)
