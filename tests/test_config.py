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


@pytest.mark.parametrize("section, key", [("sample", "prompts"), ("sample", "seeds"), ("train", "sample_prompts"),
                                          ("train", "sample_seeds")])
def test_an_empty_prompt_or_seed_list_is_refused_at_load(workflow, section, key):
    write(workflow, **{section: {key: []}})
    with pytest.raises(DreampipeError, match=rf"alice.yaml: {section}.{key}: \[\] should be non-empty"):
        config.load({}, workflow.path)


@pytest.mark.parametrize("where, value, said", [
    ("train.seed", -5, "train.seed: -5 is less than the minimum of 0"),
    ("train.seed", 2**32, "train.seed: 4294967296 is greater than the maximum of 4294967295"),
    ("sample.seeds", [0, -1], "sample.seeds.1: -1 is less than the minimum of 0"),
    ("train.sample_seeds", [2**40], "train.sample_seeds.0: 1099511627776 is greater than the maximum")])
def test_a_seed_out_of_range_is_refused_at_load(workflow, where, value, said):
    section, key = where.split(".")
    write(workflow, **{section: {key: value}})
    with pytest.raises(DreampipeError, match=f"alice.yaml: {said}"):
        config.load({}, workflow.path)


@pytest.mark.parametrize("where", ["train.sample_steps", "sample.steps", "class_images.steps"])
def test_more_sampling_steps_than_the_noise_schedule_has_is_refused_at_load(workflow, where):
    """A DDIM or DPM-Solver++ schedule has at most one step per training timestep (1000): more
    crashed the sampler (IndexError) after the whole training run."""
    section, key = where.split(".")
    write(workflow, **{section: {key: 1001}})
    with pytest.raises(DreampipeError, match=f"alice.yaml: {where}: 1001 is greater than the maximum of 1000"):
        config.load({}, workflow.path)


@pytest.mark.parametrize("prompt, said", [
    ("a photo of {name}", "has an unknown placeholder {name}; use {token}, {class_word} or {instance_prompt}"),
    ("a photo of {}", "has an unknown placeholder {}"),
    ("a { photo", "has a brace that opens or closes no placeholder; write {{ or }} for a brace itself"),
    ("a photo }", "has a brace that opens or closes no placeholder")])
def test_a_prompt_with_an_unknown_placeholder_or_a_lone_brace_is_refused_at_load(workflow, prompt, said):
    write(workflow, sample={"prompts": [prompt]})
    with pytest.raises(DreampipeError) as e:
        config.load({}, workflow.path)
    assert str(e.value).startswith(f"{workflow.path / 'config/characters/alice.yaml'}: sample.prompts: '{prompt}'")
    assert said in str(e.value)


def test_doubled_braces_are_literal_braces_in_a_prompt(workflow):
    write(workflow, sample={"prompts": ["{{logo}} on {token}"]})
    _, chars = config.load({}, workflow.path)
    assert chars["alice"]["sample"]["prompts"] == ["{logo} on zxq"]


def test_a_bad_prompt_from_config_yaml_names_config_yaml(workflow):
    write(workflow)
    with pytest.raises(DreampipeError, match=r"^config/config.yaml: train.sample_prompts: '\{nme\}' has an unknown"):
        config.load({"train": {"sample_prompts": ["{nme}"]}}, workflow.path)


def test_the_instance_prompt_knows_only_token_and_class_word(workflow):
    write(workflow, instance_prompt="{instance_prompt} again")
    with pytest.raises(DreampipeError, match=r"alice.yaml: instance_prompt: .* unknown placeholder "
                                             r"\{instance_prompt\}; use \{token\} or \{class_word\}"):
        config.load({}, workflow.path)


def test_a_bad_prompt_stops_snakemake_with_one_line_and_no_traceback(workflow):
    write(workflow, sample={"prompts": ["{name} in a hat"]})
    r = workflow.snakemake("-n", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out and "KeyError" not in out, out
    assert "alice.yaml: sample.prompts: '{name} in a hat' has an unknown placeholder {name}" in out


def test_model_id_of_a_diffusers_folder_is_the_hash_of_its_files_cached_by_size_and_mtime(tmp_path):
    import os

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"A" * 1000)
    (folder / "model_index.json").write_text("{}")
    cache = tmp_path / "cache.json"
    first = config.model_id(str(folder), cache)
    assert first != str(folder) and config.model_id(str(folder), cache) == first

    st = weights.stat()
    weights.write_bytes(b"B" * 1000)  # same size, new content
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = config.model_id(str(folder), cache)
    assert second != first

    # the cache is trusted while size and mtime stay: the same key is not hashed again
    weights.write_bytes(b"C" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert config.model_id(str(folder), cache) == second
    assert config.model_files(str(folder)) == [str(folder / "model_index.json"), str(weights)]


def test_a_damaged_model_hash_cache_is_rebuilt(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    cache = tmp_path / "cache.json"
    cache.write_text('{"truncated": ')
    assert config.model_id(str(model), cache) == __import__("hashlib").sha256(b"weights").hexdigest()[:16]


def test_omegaconf_interpolation_fills_other_keys_and_environment_variables(workflow, monkeypatch):
    monkeypatch.setenv("DREAMPIPE_TEST_PHOTOS", "example")
    write(workflow, instance_dir="${oc.env:DREAMPIPE_TEST_PHOTOS}/photos",
          class_images={"class_prompt": "a photo of a ${class_word} in a park"})
    monkeypatch.setenv("DREAMPIPE_TEST_SCRATCH", "/scratch/me")
    cfg, chars = config.load({"class_images": {"negative_prompt": "a blurry ${class_word}"},
                              "results": "${oc.env:DREAMPIPE_TEST_SCRATCH}/results"}, workflow.path)
    assert cfg["results"] == "/scratch/me/results"
    c = chars["alice"]
    assert c["instance_dir"] == "example/photos"
    assert c["class_images"]["class_prompt"] == "a photo of a robot in a park"
    assert c["class_images"]["negative_prompt"] == "a blurry robot"  # config.yaml's, filled per character


@pytest.mark.parametrize("value, said", [
    ("${nope} in a hat", "sample.prompts[0]: interpolation key 'nope' not found"),
    ("a ${ in a hat", "sample.prompts[0]: ${...} that does not parse"),
    ("${oc.env:DREAMPIPE_NO_SUCH_VARIABLE}", "sample.prompts[0]: environment variable 'DREAMPIPE_NO_SUCH_VARIABLE' "
                                             "not found")])
def test_a_bad_interpolation_is_one_line_naming_file_and_key(workflow, value, said):
    write(workflow, sample={"prompts": [value]})
    with pytest.raises(DreampipeError) as e:
        config.load({}, workflow.path)
    assert str(e.value).startswith(f"{workflow.path / 'config/characters/alice.yaml'}: {said}"), str(e.value)
    assert "\n" not in str(e.value) and "\\$" in str(e.value)


def test_held_out_photos_without_a_validation_loss_are_refused_at_load(workflow):
    workflow.character("alice", train={"validation_photos": 2, "validation_every_n_steps": 0})
    with pytest.raises(DreampipeError, match=r"alice.yaml: train.validation_photos is 2 but the validation loss is "
                                             r"never measured .* set validation_photos: 0"):
        config.load({}, workflow.path)
