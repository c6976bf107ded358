"""Sample: the final grid of a model, below the same grid from the base model (before/after)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreampipe import cli, sample, sampling
from dreampipe.images import stack


@pytest.fixture(scope="module")
def finetuned(tiny_model, tmp_path_factory):
    """Stands in for a trained model: the tiny architecture with other weights in all three networks."""
    from dreampipe import tiny

    path = tmp_path_factory.mktemp("finetuned") / "model.safetensors"
    tiny.build(path, tmp_path_factory.mktemp("tokenizer"), seed=1)
    return path


def draw(tiny_model, finetuned, out, base=True):
    model, tokenizer = tiny_model
    return sample.run(finetuned, out, ["a photo of a dog", "a red toy"], [0, 1], 64, steps=2, guidance_scale=5.0,
                      sampler="dpmsolver++", tokenizer=tokenizer, base_model=model if base else None)


def test_the_base_model_is_loaded_once_and_its_networks_then_draw_the_model(tiny_model, finetuned, tmp_path,
                                                                              monkeypatch):
    loads, networks, load, generate = [], set(), sampling.load, sampling.generate
    monkeypatch.setattr(sampling, "load", lambda path, *a, **k: (loads.append(path), load(path, *a, **k))[1])
    monkeypatch.setattr(sampling, "generate", lambda model, *a, **k: (networks.add(id(model.unet)),
                                                                      generate(model, *a, **k))[1])
    draw(tiny_model, finetuned, tmp_path / "grid.png")
    assert loads == [tiny_model[0]], "one model put on the device: the base model"
    assert len(networks) == 1, "before and after are drawn by the same networks"


def test_the_after_rows_are_the_grid_of_the_model_alone(tiny_model, finetuned, tmp_path):
    alone = np.asarray(Image.open(draw(tiny_model, finetuned, tmp_path / "alone.png", base=False))).astype(int)
    both = np.asarray(Image.open(draw(tiny_model, finetuned, tmp_path / "both.png"))).astype(int)
    before = both[:both.shape[0] - alone.shape[0] - 8]
    assert (both[-alone.shape[0]:] == alone).all()
    assert before.shape == alone.shape and np.abs(before - alone).mean() > 1, "the base model draws other images"


def test_the_sample_command_draws_with_dpm_solver_in_25_steps_by_default(tiny_model, tmp_path, monkeypatch):
    """The same default sampler as class images; the config's sample.sampler and sample.steps choose others."""
    calls, generate = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: (calls.append(k), generate(*a, **{**k, "steps": 1}))[1])
    model, tokenizer = tiny_model
    assert cli.main(["sample", str(model), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "g.png"),
                     "--prompt", "a dog", "--seeds", "0", "--resolution", "64"]) == 0
    assert [(k["sampler"], k["steps"]) for k in calls] == [("dpmsolver++", 25)]


@pytest.mark.gpu
def test_on_a_gpu_the_networks_keep_device_dtype_and_layout_and_take_the_weights_of_a_fresh_load(tiny_model,
                                                                                                   finetuned):
    import torch

    model = sampling.load(tiny_model[0], tiny_model[1])
    sampling.load_weights(model, finetuned, tiny_model[1])
    fresh = sampling.load(finetuned, tiny_model[1])
    for mine, theirs in ((model.unet, fresh.unet), (model.vae, fresh.vae), (model.text_encoder, fresh.text_encoder)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert a.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a, b), name
    conv = model.unet.conv_in.weight  # eager sampling is NCHW (speed.sampling_memory_format)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_the_sample_job_draws_the_trained_model_so_it_does_not_wait_for_the_export(workflow):
    """The final grid is drawn from training's output (sampled in the same bf16 either way), so on a
    GPU machine the sample job runs beside the CPU-bound export instead of after it."""
    workflow.character("alice")
    dry = workflow.snakemake("-n", "results/alice/samples/final.png")
    jobs = {line.split()[1].rstrip(":") for line in (dry.stdout + dry.stderr).splitlines()
            if line.startswith(("rule ", "localrule "))}
    assert {"train", "sample"} <= jobs and "export" not in jobs


# ---- the rows the train job drew ----------------------------------------------------------------

REQUEST = dict(prompts=["a photo of a dog", "a red toy"], seeds=[0, 1], resolution=64, steps=2, guidance_scale=5.0,
               sampler="dpmsolver++")


def keep_rows(model, base, colours=("red", "blue")):
    """Rows as the train job keeps them: solid colours, so a drawn row cannot pass for one."""
    rows = {}
    for title, colour, source in (("before", colours[0], sample.base_source(base, {})),
                                  ("after", colours[1], sample.model_source(model))):
        rows[title] = Image.new("RGB", (100, 40), colour)
        sample.keep(sample.rows_dir(model), title, rows[title], sample.request(**REQUEST), source)
    return rows


def test_the_sample_job_stacks_the_rows_the_train_job_drew_and_loads_no_model(tiny_model, finetuned, tmp_path,
                                                                             monkeypatch):
    """On a GPU the sample job then costs no model load and no sampling: it stacks two pictures."""
    model = tmp_path / "train" / "model.safetensors"
    model.parent.mkdir()
    shutil.copy(finetuned, model)
    rows = keep_rows(model, tiny_model[0])
    os.utime(model)  # Snakemake sets the mtime of a job's outputs again after the job
    monkeypatch.setattr(sampling, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    out = draw(tiny_model, model, tmp_path / "final.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(stack([rows["before"], rows["after"]])))


@pytest.mark.parametrize("change", ["prompts", "model rewritten", "base model"])
def test_rows_drawn_for_another_request_or_model_are_drawn_again(tiny_model, finetuned, tmp_path, monkeypatch,
                                                                 change):
    model = tmp_path / "train" / "model.safetensors"
    model.parent.mkdir()
    shutil.copy(finetuned, model)
    base = tmp_path / "base.safetensors"
    shutil.copy(tiny_model[0], base)
    keep_rows(model, base)
    loads, load = [], sampling.load
    monkeypatch.setattr(sampling, "load", lambda path, *a, **k: (loads.append(Path(path)), load(path, *a, **k))[1])
    request = dict(REQUEST)
    if change == "prompts":
        request["prompts"] = ["a photo of a cat"]
    else:  # rewritten as checkpoint.save writes: a new file in its place
        rewritten = model if change == "model rewritten" else base
        shutil.copy(tiny_model[0] if rewritten == model else finetuned, rewritten.with_suffix(".tmp"))
        os.replace(rewritten.with_suffix(".tmp"), rewritten)
    sample.run(model, tmp_path / "final.png", request.pop("prompts"), request.pop("seeds"), request.pop("resolution"),
               tokenizer=tiny_model[1], base_model=base, **request)
    final = np.asarray(Image.open(tmp_path / "final.png").convert("RGB")).astype(int)
    blue = (final == [0, 0, 255]).all(axis=-1).mean()
    red = (final == [255, 0, 0]).all(axis=-1).mean()
    # a new request draws both rows; a new model only the after row (the base model's networks
    # are not needed), a new base model only the before row
    assert loads == {"prompts": [base], "model rewritten": [model], "base model": [base]}[change]
    assert (red > 0.01) == (change == "model rewritten") and (blue > 0.01) == (change == "base model")
