"""Config and character files: each mistake stops the run with one line naming file, key and fix."""

import pytest

from dreampipe import config
from dreampipe.errors import DreampipeError


def write(workflow, **character):
    workflow.character("alice", **character)


def test_misspelt_key_names_file_key_and_nearest_valid_key(workflow):
    write(workflow, train={"max_step": 10})
    r = workflow.snakemake("-n", check=False)
    assert r.returncode != 0
    assert "alice.yaml: unknown key 'train.max_step'; did you mean 'max_steps'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_wrong_type_names_file_and_key(workflow):
    write(workflow, train={"max_steps": "many"})
    r = workflow.snakemake("-n", check=False)
    assert r.returncode != 0
    assert "alice.yaml: train.max_steps: 'many' is not of type 'integer'" in r.stderr


def test_missing_photos_dir_names_file_and_fix(workflow):
    write(workflow, instance_dir="photos/nowhere")
    r = workflow.snakemake("-n", check=False)
    assert r.returncode != 0
    assert "alice.yaml: instance_dir 'photos/nowhere' is not a folder" in r.stderr


def test_unknown_top_level_key_in_config_yaml(tmp_path):
    with pytest.raises(DreampipeError, match=r"config.yaml: unknown key 'base_modle'; did you mean 'base_model'\?"):
        config.load({"base_modle": "x"}, tmp_path)


def test_selecting_characters_with_config_characters(workflow):
    write(workflow)
    workflow.character("bob")
    cfg, chars = config.load({"characters": "bob"}, workflow.path)
    assert list(chars) == ["bob"]
    with pytest.raises(DreampipeError, match="no character 'bobb'.*did you mean 'bob'"):
        config.load({"characters": "bobb"}, workflow.path)


def test_character_overrides_defaults_and_fills_placeholders(workflow):
    write(workflow, token="sks", class_word="dog", train={"max_steps": 7})
    _, chars = config.load({"train": {"learning_rate": 3e-6}}, workflow.path)
    c = chars["alice"]
    assert c["train"]["max_steps"] == 7 and c["train"]["learning_rate"] == 3e-6
    assert c["instance_prompt"] == "a photo of sks dog"
    assert c["class_images"]["class_prompt"] == "a photo of a dog"
    assert c["prepare"]["resolution"] == 512
