"""The docs cannot drift from the code."""

import re

import jsonschema
import pytest
import yaml

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


# Annotation keywords beside the validating ones: any other key in a schema is a slip, such as a
# description cut at its first comma by a YAML flow mapping, its rest turned into empty keys.
SCHEMA_KEYWORDS = set(jsonschema.Draft202012Validator.VALIDATORS) | {
    "$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples", "deprecated"}


def schema_nodes(schema: dict, where: str):
    """(key path, schema) of every property schema, nested ones included."""
    yield where, schema
    for key, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], f"{where}[]")


def readme_meanings() -> dict[str, str]:
    """{key: meaning} of every row of config/README.md, split on unescaped pipes."""
    rows = {}
    for line in (ROOT / "config" / "README.md").read_text().splitlines():
        cells = [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


@pytest.mark.parametrize("name", ["config", "character"])
def test_every_schema_key_is_a_json_schema_keyword(name):
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / f"{name}.schema.yaml").read_text())
    for where, node in schema_nodes(schema, name):
        assert set(node) <= SCHEMA_KEYWORDS, f"{where}: unknown schema keys {set(node) - SCHEMA_KEYWORDS}"


def test_each_description_reaches_config_readme_whole():
    config_schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    char_schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "character.schema.yaml").read_text())
    expected = {k: p["description"] for k, p in char_schema["properties"].items() if "description" in p}
    for key, prop in config_schema["properties"].items():
        for sub, p in prop.get("properties", {key: prop}).items():
            expected[f"{key}.{sub}" if sub != key else key] = p["description"]
    meanings = readme_meanings()
    for key, description in expected.items():
        assert meanings[key] == " ".join(description.split()), key
        assert description.rstrip().endswith("."), f"{key}: description cut short: {description!r}"


def test_a_description_with_a_pipe_stays_in_its_table_cell(monkeypatch):
    real = config._schema

    def schema(name):
        s = real(name)
        if name == "config":
            s["properties"]["results"]["description"] = "a | b, c: d"
        return s

    monkeypatch.setattr(config, "_schema", schema)
    rows = [line for line in config.reference_markdown().splitlines() if line.startswith("| `results`")]
    assert [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]] == ["`results`", '`"results"`', r"a \| b, c: d"]


def rules_asking_a_gpu() -> set[str]:
    names = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]:
            if re.search(r"^\s+gpu=", block, re.M):
                names.add(block.split(":")[0])
    return names


def test_readme_and_the_slurm_profile_name_every_rule_that_asks_a_gpu():
    gpu = rules_asking_a_gpu()
    assert {"class_images", "train", "sample", "evaluate"} <= gpu
    cluster = (ROOT / "README.md").read_text().split("## Running on a cluster")[1].split("\n## ")[0]
    [bullet] = [b for b in cluster.split("\n- ") if b.startswith("**GPUs.**")]
    sentence = bullet.split("; the plugin")[0]
    assert set(re.findall(r"`(\w+)`", sentence)) == gpu
    profile = yaml.safe_load(next((ROOT / "profiles" / "slurm").glob("*.yaml")).read_text())
    assert gpu <= set(profile["set-resources"]), "a GPU job would get the 2 GB of the CPU steps"


def quality_results() -> tuple[str, list[dict]]:
    """docs/quality.md and the rows of its Results table, numbers as floats."""
    text = (ROOT / "docs" / "quality.md").read_text()
    lines = [line for line in text.split("## Results")[1].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        # a rate is followed by its 95 % interval, "0.23 [0.15, 0.35]": the rate counts
        rates = [re.fullmatch(r"(\d+\.\d+)( \[\d\.\d\d, \d\.\d\d\])?", c) for c in cells]
        rows.append({h: float(m.group(1)) if m else c for h, c, m in zip(header, cells, rates)})
    return text, rows


def test_quality_doc_says_what_its_table_shows():
    text, rows = quality_results()
    base, *recipes = rows
    assert base["recipe"].startswith("base model") and len(recipes) >= 5
    # every range the prose quotes ("class shape rate 0.88-1.00") spans the finetuned recipes
    quoted = re.findall(r"(subject fidelity|class shape rate|class colour entropy|class pattern entropy|"
                        r"language drift) (\d\.\d\d)-(\d\.\d\d)", " ".join(text.split()))
    assert quoted
    for column, low, high in quoted:
        values = [r[column] for r in recipes]
        assert (float(low), float(high)) == (min(values), max(values)), column
    # the described reference is what the base model draws when told in words, not a ceiling
    reference = float(re.search(r"draws the subject in\s+\*\*(\d\.\d\d)[^*]*\*\*", text).group(1))
    if max(r["subject fidelity"] for r in recipes) > reference:
        assert not re.search(r"can(not| ?n't)? exceed|at most about", text), "a recipe beats the 'limit'"
    # overfitting to the subject shows as class samples turning into it (language drift)
    if all(r["language drift"] <= base["language drift"] for r in recipes):
        assert "overfit" not in text
