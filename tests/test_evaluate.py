"""Held-out evaluation (evaluate.py): seeds apart from the class images, intervals next to every
rate, and recontextualisation, on the committed toy model at tiny size."""

import json
import re
from pathlib import Path

import pytest
import yaml

from dreampipe import evaluate, toyworld

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "toy-sd"


@pytest.mark.parametrize("hits, n, low, high", [
    (0, 10, 0.0, 0.2775),  # Wilson score interval, z = 1.96 (Newcombe 1998, table I)
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_the_wilson_interval_matches_published_values(hits, n, low, high):
    assert evaluate.wilson(hits, n) == pytest.approx((low, high), abs=1e-4)


def test_evaluation_seeds_never_draw_a_class_image_and_dev_and_test_are_apart():
    # Class image i is drawn from seed i (class_images.py); the schema caps how many there are.
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    most = schema["properties"]["class_images"]["properties"]["num_class_images"]["maximum"]
    dev, test = set(evaluate.SEED_SETS["dev"]), set(evaluate.SEED_SETS["test"])
    assert min(dev | test) >= most, "class image seeds are 0 .. num_class_images - 1"
    assert not dev & test and len(test) >= 64 and len(dev) >= 16
    # The workflow reports the test set.
    rule = (ROOT / "workflow/rules/evaluate.smk").read_text()
    assert re.search(r"--seed-set test\b", rule) and "--seeds" not in rule


def test_the_workflow_evaluates_with_the_sampling_of_the_documented_figures(tmp_path, monkeypatch):
    """docs/quality.md's tables come from bench/toy_recipes.py; the demo's evaluation.md must
    read the same figures for the same model, so both sample as evaluate.STEPS and GUIDANCE say."""
    from dreampipe import cli

    called = {}
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: called.update(steps=a[10], guidance=a[11]))
    cli.main(["evaluate", "m.safetensors", "--base-model", "b.safetensors", "--classifier", "c", "--instance-dir",
              "i", "--out", str(tmp_path / "e.json"), "--instance-prompt", "a photo of zxq star",
              "--class-prompt", "a photo of a star", "--class-word", "star"])
    assert called == {"steps": evaluate.STEPS, "guidance": evaluate.GUIDANCE}
    assert "evaluate.STEPS, evaluate.GUIDANCE" in (ROOT / "bench/toy_recipes.py").read_text()


def test_scores_put_an_interval_next_to_every_rate():
    subject = {"shape": "star", "colour": "purple", "pattern": "dotted"}
    hit = {**subject, "background": "green"}
    s = evaluate.scores([hit] * 3 + [{**hit, "pattern": "plain"}], [hit, {**hit, "colour": "red"}], subject,
                        "star", recontext=[(hit, "green"), ({**hit, "background": "blue"}, "green")])
    assert s["subject_fidelity"] == 0.75 and s["ci95"]["subject_fidelity"] == pytest.approx(evaluate.wilson(3, 4))
    assert s["recontext_background"] == 0.5 and s["recontext_subject"] == 1.0 and s["recontext_both"] == 0.5
    rates = {k for k, v in s.items() if isinstance(v, float) and "entropy" not in k}
    assert rates and rates == set(s["ci95"]) - {"subject_attributes"}
    assert set(s["ci95"]["subject_attributes"]) == set(evaluate.SUBJECT_KEYS)


def test_recontext_prompts_place_the_subject_on_other_backgrounds():
    subject = {"shape": "star", "colour": "purple", "pattern": "dotted"}
    prompts = evaluate.recontext_prompts("a photo of zxq star", subject, 12)
    colours = [c for _, c in prompts]
    assert prompts[0] == ("a photo of zxq star on a red background", "red")
    assert ("a photo of zxq star on an orange background", "orange") in prompts
    assert set(colours) == set(toyworld.COLOURS) - {"purple", "white"}  # not its own colour, nor the photos'


def test_evaluate_on_the_committed_model_writes_rates_intervals_and_recontext(tmp_path, example_photos, monkeypatch):
    from PIL import Image

    from dreampipe import prepare

    monkeypatch.setattr(evaluate, "GRID_SEEDS", 2)  # the grid shows the first seeds, the numbers all

    instance = tmp_path / "instance"
    prepare.run(example_photos, instance, 64, "pad", "white", "a photo of zxq star")
    model, tokenizer = str(TOY / "toy-sd.safetensors"), str(TOY / "tokenizer")
    r = evaluate.run(model, model, tokenizer, TOY / evaluate.CLASSIFIER_FILE, instance, tmp_path / "e.json",
                     "a photo of zxq star", "a photo of a star", "star", evaluate.SEED_SETS["dev"][:3], 2, 5.0,
                     tmp_path / "e.png")
    assert Image.open(tmp_path / "e.png").size == (2 * 128, 7 * (128 + 14)), "2 seeds x 7 prompt rows"
    assert json.loads((tmp_path / "e.json").read_text()) == r
    for side in ("before", "after"):
        lo, hi = r[side]["ci95"]["recontext_background"]
        assert 0 <= lo <= r[side]["recontext_background"] <= hi <= 1
    assert r["recontext_prompts"][0] == "a photo of zxq star on a red background"
    md = (tmp_path / "e.md").read_text()
    assert "background as asked" in md and re.search(r"\| \d\.\d\d \[\d\.\d\d, \d\.\d\d\] \|", md)


def test_the_classifier_reads_decoded_pictures_from_the_model():
    """Validated where it is used: on pictures the toy model decodes, not only on clean ones.
    Base-model samples of held-out fully described things ("a photo of a red striped star on a
    blue background"): agreement with the prompt is a lower bound of the classifier's accuracy (a
    miss is the model's or the classifier's). VAE round trips of held-out toy pictures: the
    classifier alone, on the decoder's blur. Measured on the GPU-pretrained model (2026-11-30,
    test seeds / 64 pictures): samples shape 1.00, colour 0.98, pattern 0.86, background 0.92;
    round trips 0.92, 1.00, 0.97, 1.00 (the CPU model before it: 0.94, 0.67, 0.75, 0.91 and 0.86,
    0.80, 0.77, 1.00; clean pictures: >= 0.9, test_toyworld.py). docs/quality.md says what this means for the
    subject fidelity, which needs three attributes read right together."""
    import torch

    from dreampipe import pretrain, sampling

    net = evaluate.load_classifier(TOY / evaluate.CLASSIFIER_FILE)
    model = sampling.load(str(TOY / "toy-sd.safetensors"), str(TOY / "tokenizer"), None)
    samples = evaluate.prompt_agreement(model, net, list(evaluate.SEED_SETS["dev"]), steps=20, guidance_scale=5.0)[0]
    with torch.no_grad():
        means, _, originals = pretrain.encode(model.vae, list(range(8 * 10**6, 8 * 10**6 + 64)))
        round_trips = evaluate.agreement(net.predict(sampling.to_pil(model.vae.decode(means).sample)), originals)[0]
    for acc, least in ((samples["prompt_agreement"], 0.7), (round_trips, 0.65)):
        assert min(acc.values()) >= least, acc
        assert acc["background"] >= 0.85, acc
