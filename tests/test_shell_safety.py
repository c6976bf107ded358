"""No value from a config or character file reaches bash as code: every one is quoted, and a
character name (a file name, used in every output path and in a regex) must be a safe word."""

import shutil

import pytest

HOSTILE_NAMES = ["b;touch INJ;x", "a`touch INJ`b", "a$(touch INJ)b", "a b", "it's", "a|b", "a$", "..x",
                 "x" * 101]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_character_name_outside_the_safe_pattern_is_refused_in_one_line(workflow, name):
    workflow.character(name)
    r = workflow.snakemake(check=False)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "dreampipe: error" in line]
    assert len(lines) == 1 and f"{name}.yaml: the character name" in lines[0], r.stderr
    assert "letters, digits" in lines[0] and "rename the file" in lines[0]
    assert "Traceback" not in r.stderr
    assert not list(workflow.path.rglob("INJ"))


def test_a_dot_in_a_name_is_a_literal_dot_in_the_wildcard_constraint(workflow):
    workflow.character("alice.v2")
    assert ("settings", "alice.v2") in workflow.planned()
    r = workflow.snakemake("-n", "results/alicexv2/settings.yaml", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "MissingRuleException" in out and "KeyError" not in out, out


def test_hostile_paths_and_prompts_run_the_workflow_without_running_a_command(workflow, tiny_model):
    _, tokenizer = tiny_model
    photos = workflow.path / "photos $(touch INJ1) `touch INJ2`;touch INJ3"
    shutil.copytree(workflow.path / "example" / "photos", photos)
    tok = workflow.path / "tok $(touch INJ4)"
    shutil.copytree(tokenizer, tok)
    workflow.character("alice", instance_dir=photos.name, token="zxq", class_word="robot",
                       tokenizer=tok.name, prepare={"resolution": 64},
                       class_images={"class_prompt": "a 'robot' $(touch INJ6)", "num_class_images": 2,
                                     "steps": 2, "negative_prompt": "`touch INJ7`"},
                       sample={"prompts": ["{instance_prompt} `touch INJ8` \"x\""], "seeds": [0], "steps": 2},
                       train={"max_steps": 2, "sample_every_n_steps": 0, "sample_steps": 2})
    r = workflow.snakemake("--config", "results=res $(touch INJ9) 'q' r", check=False)
    assert not list(workflow.path.rglob("INJ*")), r.stdout[-2000:] + r.stderr[-4000:]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (workflow.path / "res $(touch INJ9) 'q' r" / "alice" / "samples" / "final.png").is_file()


# params that hold several arguments, each already quoted by shlex in workflow/rules/common.smk
SHLEX_JOINED = {"params.args", "params.base_options", "params.tokenizer", "params.prompts", "params.seeds",
                "params.subjects", "params.masks", "params.ranks"}


def test_every_placeholder_in_a_shell_command_is_quoted():
    import re

    from conftest import ROOT

    unquoted, commands = [], 0
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for shell in re.findall(r"shell:\n((?:\s+\".*\"\n)+)", smk.read_text()):
            commands += 1
            for name, spec in re.findall(r"\{([\w.]+)(:q)?\}", shell):
                if not spec and name not in SHLEX_JOINED:
                    unquoted.append(f"{smk.name}: {{{name}}}")
    assert unquoted == []
    assert commands == len(re.findall(r"^\s+shell:", "".join(
        p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk")), re.M)) >= 10
