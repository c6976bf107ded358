"""The dreampipe command: every failure ends in one line on stderr; the log keeps the details."""

import subprocess
import sys
from pathlib import Path

import pytest

from dreampipe import checkpoint
from dreampipe.errors import DreampipeError

DREAMPIPE = Path(sys.executable).parent / "dreampipe"


def dreampipe(*args):
    return subprocess.run([DREAMPIPE if DREAMPIPE.exists() else "dreampipe", *map(str, args)],
                          capture_output=True, text=True)


def test_an_unexpected_exception_is_one_line_and_its_traceback_goes_to_the_log(tmp_path):
    log = tmp_path / "logs" / "docs.log"
    r = dreampipe("config-docs", tmp_path / "no" / "such" / "README.md", "--log", log)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert "config-docs: error: unexpected FileNotFoundError" in line and "README.md" in line
    assert f"the traceback is in {log}" in line
    assert "Traceback (most recent call last)" in log.read_text()
    assert "FileNotFoundError" in log.read_text()


def test_without_a_log_file_the_line_says_how_to_keep_the_traceback(tmp_path):
    r = dreampipe("config-docs", tmp_path / "no" / "such" / "README.md")
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert "unexpected FileNotFoundError" in line and "run it again with --log FILE" in line


def test_a_user_mistake_keeps_its_message_and_is_logged(tmp_path):
    log = tmp_path / "x.log"
    r = dreampipe("class-images", "--store", tmp_path / "s", "--manifest", tmp_path / "m.json",
                  "--prompt", "p", "--log", log)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.endswith("class-images: error: --store needs --model and --num (or give --prepared instead)")
    assert "--store needs --model" in log.read_text() and "Traceback" not in log.read_text()


@pytest.mark.parametrize("free, need, said", [(2**20, 3 * 2**20, "needs 3.0 MiB but only 1.0 MiB is free"),
                                              (500, 2000, "needs 2.0 KiB but only 500 B is free"),
                                              (2**30, 5 * 2**30, "needs 5.0 GiB but only 1.0 GiB is free")])
def test_a_full_disk_is_reported_in_units_that_show_the_numbers(tmp_path, monkeypatch, free, need, said):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    with pytest.raises(DreampipeError, match=said):
        checkpoint.check_disk_space(tmp_path / "model.safetensors", need)


def test_a_full_disk_is_said_in_words():
    import errno

    from dreampipe import cli

    e = OSError(errno.ENOSPC, "No space left on device", "/r/alice/train/model.safetensors")
    assert cli.unexpected(e, "train.log") == ("no space left on the disk writing /r/alice/train/model.safetensors; "
                                              "free some space and run it again; the traceback is in train.log")
