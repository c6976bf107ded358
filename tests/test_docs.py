"""The docs cannot drift from the code."""

import re

from conftest import ROOT
from dreampipe import config


def test_config_readme_is_generated_from_the_schemas():
    assert (ROOT / "config" / "README.md").read_text() == config.reference_markdown(), \
        "config/README.md is stale: run `dreampipe config-docs`"


def test_config_readme_lists_every_schema_key_with_its_default():
    documented = set(re.findall(r"^\| `([\w.]+)` \|", (ROOT / "config" / "README.md").read_text(), re.M))
    keys = {k for k, v in config.defaults().items() if not isinstance(v, dict)}
    keys |= {f"{s}.{k}" for s, v in config.defaults().items() if isinstance(v, dict) for k in v}
    assert keys <= documented
    assert {"instance_dir", "token", "class_word", "instance_prompt"} <= documented


def test_shipped_config_and_example_character_are_valid(tmp_path):
    cfg = config.read_yaml(ROOT / "config" / "config.yaml")
    _, characters = config.load(cfg, ROOT)
    assert "example" in characters
