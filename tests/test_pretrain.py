"""pretrain-toy at tiny size: the stages, the time budget, the loss curve and the base model's check.
The real run (docs/quality.md) is bench/pretrain_toy_gpu.sh on a GPU."""

import json

import numpy as np
import pytest
import torch

from dreampipe import checkpoint, evaluate, pretrain

TINY = {"vae_steps": 3, "vae_batch_size": 4, "vae_warmup_steps": 1, "latents": 16, "unet_steps": 4,
        "unet_batch_size": 4, "unet_warmup_steps": 1, "classifier_steps": 2, "classifier_reconstructions": 8,
        "check_seeds": 2, "check_steps": 2, "sample_seeds": 1, "cpu_threads": 0}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    pretrain.run(out, TINY)
    return out


def test_pretrain_writes_an_fp16_sd_checkpoint_the_classifier_and_the_loss_curve(pretrained):
    for name in ("toy-sd.safetensors", evaluate.CLASSIFIER_FILE, "samples.png", "pretrain-loss.png",
                 "pretrain-loss.csv", "check.png"):
        assert (pretrained / name).stat().st_size > 0, name
    sd, _ = checkpoint.read_state_dict(pretrained / "toy-sd.safetensors")
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    stages = {line.split(",")[0] for line in (pretrained / "pretrain-loss.csv").read_text().splitlines()[1:]}
    assert stages == {"vae", "unet", "classifier"}


def test_pretrain_json_records_device_steps_and_the_check_with_intervals(pretrained):
    summary = json.loads((pretrained / "pretrain.json").read_text())
    assert set(summary) == {"vae", "unet", "classifier", "check"}
    assert summary["unet"]["device"].startswith("CPU") and summary["unet"]["steps"] == TINY["unet_steps"]
    assert summary["vae"]["steps"] == TINY["vae_steps"]
    check = summary["check"]
    assert set(check["prompt_agreement"]) == {"shape", "colour", "pattern", "background"}
    assert all(0 <= lo <= check["prompt_agreement"][k] <= hi <= 1 for k, (lo, hi) in check["ci95"].items())
    assert check["seeds"] == list(evaluate.SEED_SETS["test"][:TINY["check_seeds"]])


def test_a_time_budget_stops_training_early_and_records_the_steps_to_repeat_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "CALIBRATION", (1, 2))
    pretrain.run(tmp_path, {**TINY, "vae_steps": 500, "vae_seconds": 0.01}, stages=["vae", "unet"])
    done = json.loads((tmp_path / "pretrain.json").read_text())["vae"]
    assert 2 <= done["steps"] < 500
    assert done["settings"]["vae_steps"] == done["steps"] and done["settings"]["vae_seconds"] is None
    # the model file's settings repeat the run too
    _, meta = checkpoint.read_state_dict(tmp_path / pretrain.MODEL_FILE)
    written = json.loads(meta["dreampipe.pretrain"])
    assert written["vae_steps"] == done["steps"] and written["vae_seconds"] is None


def test_batches_are_the_same_whatever_the_number_of_workers():
    one = [x for x, _ in pretrain.batches(10**7, 4, 3, workers=0)]
    two = [x for x, _ in pretrain.batches(10**7, 4, 3, workers=2)]
    assert len(one) == 3 and all(np.array_equal(a, b) for a, b in zip(one, two))


def test_the_caption_table_holds_every_caption_of_each_distinct_thing_once(tmp_path):
    from transformers import CLIPTokenizer

    from dreampipe import tiny, toyworld

    tiny.write_tokenizer(tmp_path, max_length=pretrain.MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    striped, plain = toyworld.Thing("star", "red", "striped", "blue"), toyworld.Thing("circle", "green", "plain", "red")
    table, weights, row_of, empty = pretrain.caption_table([striped, plain, striped], tok)
    assert row_of.tolist() == [0, 1, 0] and torch.allclose(weights.sum(1), torch.ones(2))
    for row, thing in enumerate((striped, plain)):
        captions = {tok.decode(table[row, i], skip_special_tokens=True).strip(): float(w)
                    for i, w in enumerate(weights[row]) if w > 0}
        assert captions == pytest.approx(toyworld.caption_variants(thing))
    assert tok.decode(empty, skip_special_tokens=True).strip() == ""


def test_the_lr_warms_up_then_decays_to_zero_and_the_warm_up_ignores_the_total():
    assert pretrain.lr_factor(0, 100, 10) == pytest.approx(1 / 25)
    assert pretrain.lr_factor(10, 100, 10) == pytest.approx(1)
    assert pretrain.lr_factor(5, 100, 10) == pretrain.lr_factor(5, 5000, 10)
    assert pretrain.lr_factor(100, 100, 10) == pytest.approx(0, abs=1e-6)


def test_fit_follows_a_given_scheduler_and_refuses_one_with_a_time_budget(tmp_path):
    # The classifier trains through fit with a one-cycle learning rate made for its steps.
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    lrs = []

    def step(_):
        lrs.append(opt.param_groups[0]["lr"])
        (w * 0).sum().backward()
        return w.detach().sum()

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    record = pretrain.Log(tmp_path / "loss.csv", "toy")
    assert pretrain.fit(opt, step, steps=3, record=record, device="cpu", scheduler=sched) == 3
    assert lrs == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="time budget"):
        pretrain.fit(opt, step, steps=3, seconds=1.0, record=record, device="cpu", scheduler=sched)


def test_the_classifier_trains_through_fit_with_a_row_of_its_loss_per_step(tmp_path):
    record = pretrain.Log(tmp_path / "loss.csv", "classifier")
    net = pretrain.train_classifier([], steps=2, seed=0, record=record, device="cpu", batch_size=4)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[1:] and [r.split(",")[:2] for r in rows[1:]] == [["classifier", "0"], ["classifier", "1"]]
    assert isinstance(net, evaluate.AttributeClassifier) and not net.training


def test_the_gpu_settings_are_larger_than_the_cpu_default():
    cpu, gpu = pretrain.settings_for("cpu"), pretrain.settings_for("cuda")
    assert gpu["latents"] >= 4 * cpu["latents"] and gpu["unet_seconds"] and not cpu["unet_seconds"]
    assert pretrain.settings_for("cuda", {"latents": 8})["latents"] == 8


@pytest.mark.gpu
def test_pretrain_runs_on_the_gpu(tmp_path):
    pretrain.run(tmp_path, {**TINY, "unet_steps": 60, "unet_batch_size": 64, "workers": 2})
    summary = json.loads((tmp_path / "pretrain.json").read_text())
    assert summary["unet"]["device"] == torch.cuda.get_device_name()
    assert summary["unet"]["unet_graphs"], "the UNet's forward and backward replay as CUDA graphs"
    losses = [float(r.split(",")[2]) for r in (tmp_path / "pretrain-loss.csv").read_text().splitlines()[1:]
              if r.startswith("unet,")]
    assert all(l == l for l in losses) and losses[-1] < losses[0]
