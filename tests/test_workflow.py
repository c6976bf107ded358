"""End to end: the Snakemake DAG on the tiny model, and its staleness rules."""

import json

import torch
import yaml

from conftest import TINY_CONFIG
from dreampipe import checkpoint, report_check, sampling


def test_two_characters_run_end_to_end_then_only_stale_steps_rerun(workflow):
    workflow.character("alice")
    workflow.character("bob", token="sks", class_word="robot")
    workflow.snakemake()
    out = workflow.path / "results"
    for name in ("alice", "bob"):
        assert (out / name / f"{name}.safetensors").stat().st_size > 0
        assert (out / name / "samples" / "final.png").exists()
        assert len(list((out / name / "instance" / "0").glob("0*.png"))) == 6
        assert (out / name / "train" / "loss.png").exists()
        assert not (out / name / ".state").exists(), "state is removed once the model is written"
        sample_log = (out / name / "logs" / "sample.log").read_text()
        assert sample_log.count("row drawn by the train job") == 2 and "loaded in" not in sample_log

    # the exported file holds the trained weights in fp16 (export.dtype's default), with the
    # training settings in its metadata, and loads back to draw an image
    exported, meta = checkpoint.read_state_dict(out / "bob" / "bob.safetensors")
    trained, _ = checkpoint.read_state_dict(out / "bob" / "train" / "model.safetensors")
    assert {v.dtype for v in exported.values() if v.is_floating_point()} == {torch.float16}
    unet = [k for k in trained if k.startswith(checkpoint.UNET_PREFIX)]
    assert unet and all(torch.equal(exported[k], trained[k].half()) for k in unet)
    assert json.loads(meta["dreampipe.settings"])["subjects"][0]["token"] == "sks"
    model = checkpoint.load(out / "bob" / "bob.safetensors", tokenizer=out / "base" / "tiny-sd-tokenizer")
    [image] = sampling.generate(model, ["a photo of sks robot"], [0], resolution=64, steps=2)
    assert image.size == (64, 64) and any(lo < hi for lo, hi in image.getextrema()), "a blank image"

    # the report shows every character's pictures, each identical to its file
    workflow.snakemake("--report", "results/report.html")
    report = workflow.path / "results" / "report.html"
    shown = set(report_check.report_items(report))
    for name in ("alice", "bob"):
        assert {f"results/{name}/instance/0/contact_sheet.png", f"results/{name}/train/loss.png",
                f"results/{name}/samples/final.png", f"results/{name}/settings.yaml",
                f"results/{name}/train/samples.png"} <= shown
    assert any(p.startswith("results/class/") for p in shown)
    assert report_check.check_files(report, workflow.path) == []

    # a second run has nothing to do
    again = workflow.snakemake()
    assert "Nothing to be done" in again.stdout + again.stderr

    # both characters share one class set, made once
    class_sets = list((out / "class").iterdir())
    assert len(class_sets) == 1

    # a training value of bob reruns bob's train, export and sample only
    bob = yaml.safe_load((workflow.path / "config/characters/bob.yaml").read_text())
    workflow.character("bob", **{**bob, "train": {"max_steps": 3}})
    assert workflow.planned() == [("export", "bob"), ("sample", "bob"), ("settings", "bob"), ("train", "bob")]

    # a sampling prompt of alice reruns alice's sampling only, not training
    workflow.character("bob", **bob)
    workflow.character("alice", sample={"prompts": ["a photo of zxq robot in a hat"]})
    assert workflow.planned() == [("sample", "alice"), ("settings", "alice")]

    # how often training samples or saves does not shape the weights: nothing reruns
    workflow.character("alice", train={"sample_every_n_steps": 1, "save_every_n_steps": 2, "keep_last": 5})
    assert workflow.planned() == [("settings", "alice")]


def test_raising_the_class_image_count_generates_only_the_new_images(workflow):
    workflow.character("alice", class_images={"num_class_images": 2, "steps": 2}, train={"max_steps": 1})
    workflow.snakemake()
    [store] = (workflow.path / "results" / "class").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in store.glob("0*.png")}
    assert sorted(before) == ["00000.png", "00001.png"]

    workflow.character("alice", class_images={"num_class_images": 5, "steps": 2}, train={"max_steps": 1})
    workflow.snakemake()
    after = {p.name: p.stat().st_mtime_ns for p in store.glob("0*.png")}
    assert sorted(after) == [f"{i:05d}.png" for i in range(5)]
    assert all(after[name] == mtime for name, mtime in before.items()), "old images were rewritten"


def test_use_ema_and_base_model_fallback_reach_every_step_that_loads_the_base_model(workflow, tiny_model):
    """The base file's plain UNet does not fit (only its EMA copy does) and it has no VAE (the
    fallback file has): the run succeeds only if both settings reach class images, training and
    sampling."""
    path, tokenizer = tiny_model
    sd, meta = checkpoint.read_state_dict(path)
    unet = {k: v for k, v in sd.items() if k.startswith(checkpoint.UNET_PREFIX)}
    ema = {"model_ema." + "".join(k.split(".")[1:]): v.clone() for k, v in unet.items()}
    broken = {k: v[:1] if k.endswith("out.2.weight") else v for k, v in unet.items()}
    text = {k: v for k, v in sd.items() if k.startswith(checkpoint.TEXT_PREFIX)}
    checkpoint.write_file({**broken, **ema, **text}, workflow.path / "base.safetensors", "fp32", meta)
    checkpoint.write_file(sd, workflow.path / "full.safetensors", "fp32", meta)
    workflow.write_config({**TINY_CONFIG, "base_model": "base.safetensors", "use_ema": True,
                           "base_model_fallback": "full.safetensors", "tokenizer": str(tokenizer)})
    workflow.character("alice")
    workflow.snakemake()
    assert (workflow.path / "results" / "alice" / "samples" / "final.png").exists()

    # either setting shapes the class images and the training
    workflow.write_config({**TINY_CONFIG, "base_model": "base.safetensors", "use_ema": False,
                           "base_model_fallback": "full.safetensors", "tokenizer": str(tokenizer)})
    assert {("class_images", ""), ("train", "alice")} <= set(workflow.planned())
    workflow.write_config({**TINY_CONFIG, "base_model": "base.safetensors", "use_ema": True,
                           "base_model_fallback": "nowhere.safetensors", "tokenizer": str(tokenizer)})
    r = workflow.snakemake("-n", check=False)
    assert r.returncode != 0 and "base_model_fallback 'nowhere.safetensors' is not a file" in r.stderr


def rewrite_unet_weights(folder):
    """New values in the UNet file of a diffusers folder, same size, as a retrained copy would have."""
    from safetensors.torch import load_file, save_file

    [weights] = (folder / "unet").glob("*.safetensors")
    sd = load_file(weights)
    save_file({k: v * 1.01 for k, v in sd.items()}, weights)


def test_rewriting_the_weights_inside_a_diffusers_base_model_reruns_what_it_shaped(workflow, tiny_model):
    path, tokenizer = tiny_model
    checkpoint.save_diffusers(checkpoint.load(path, tokenizer), workflow.path / "base-diffusers", dtype="fp32")
    workflow.write_config({**TINY_CONFIG, "base_model": "base-diffusers"})
    workflow.character("alice")
    workflow.snakemake("--until", "train")
    assert ("train", "alice") not in workflow.planned()

    rewrite_unet_weights(workflow.path / "base-diffusers")
    assert {("class_images", ""), ("train", "alice")} <= set(workflow.planned())
