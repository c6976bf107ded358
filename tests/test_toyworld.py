"""The toy world, its pretrained base model and the quality metrics, down to a DreamBooth run of
the demo on the committed model whose subject the metrics recognise."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from dreampipe import checkpoint, class_images, config, evaluate, prepare, pretrain, tiny, toyworld, train

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "toy-sd"


def test_a_seed_always_draws_the_same_picture_and_caption():
    a, b, c = toyworld.example(7), toyworld.example(7), toyworld.example(8)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    assert a[0].tobytes() != c[0].tobytes()


def test_the_caption_names_the_colours_that_are_drawn():
    for seed in range(50):
        image, thing, caption = toyworld.example(seed)
        arr = np.asarray(image).reshape(-1, 3)
        colours, counts = np.unique(arr, axis=0, return_counts=True)
        by_count = [tuple(int(v) for v in colours[i]) for i in np.argsort(-counts)]
        assert tuple(np.asarray(image)[0, 0]) == toyworld.COLOURS[thing.background]
        assert toyworld.COLOURS[thing.colour] in by_count[:3]
        words = thing.caption().split()
        assert {thing.shape, thing.colour} <= set(words) and words[-2] == thing.background
        assert (thing.pattern in words) == (thing.pattern != "plain")
        assert set(caption.split()) <= set(words), "a dropped word is never replaced by another"


def test_caption_variants_are_every_caption_a_thing_gets_with_its_probability():
    striped = toyworld.Thing("star", "red", "striped", "blue")
    variants = toyworld.caption_variants(striped)
    assert len(variants) == 8 and sum(variants.values()) == pytest.approx(1)
    assert variants["a photo of a red star on a blue background"] == pytest.approx(0.6 * 0.4 * 0.6)
    rng = random.Random(0)
    drawn = [striped.caption(rng) for _ in range(4000)]
    assert all(abs(drawn.count(c) / 4000 - p) < 0.03 for c, p in variants.items())
    plain = toyworld.caption_variants(toyworld.Thing("circle", "green", "plain", "red"))
    assert len(plain) == 4 and sum(plain.values()) == pytest.approx(1)


def test_the_pretraining_world_never_shows_the_subject():
    rng = random.Random(0)
    subject = (toyworld.SUBJECT.shape, toyworld.SUBJECT.colour, toyworld.SUBJECT.pattern)
    assert all((t.shape, t.colour, t.pattern) != subject
               for t in (toyworld.sample(rng) for _ in range(5000)))


def test_every_caption_word_is_a_tokenizer_word_and_captions_round_trip():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOY / "tokenizer"))
    captions = [toyworld.example(s)[2] for s in range(300)]
    assert {w for c in captions for w in c.split()} <= set(tiny.WORDS)
    for caption in captions[:50]:
        assert tok.decode(tok(caption).input_ids, skip_special_tokens=True).strip() == caption
    assert len(tok(max(captions, key=len)).input_ids) <= tok.model_max_length


def test_the_committed_base_model_is_a_small_fp16_sd_checkpoint_whose_latent_scale_gives_unit_variance():
    path = TOY / "toy-sd.safetensors"
    assert path.stat().st_size < 20 * 2**20
    sd, _ = checkpoint.read_state_dict(path)
    assert {str(v.dtype) for k, v in sd.items() if v.is_floating_point()} == {"torch.float16"}
    # What the UNet was pretrained on: VAE latents of toy pictures, scaled to unit variance (as
    # SD's 0.18215). Fresh seeds, never encoded in pretraining; SD's factor would give 0.23.
    model = checkpoint.load(path, tokenizer=TOY / "tokenizer")
    means, _, _ = pretrain.encode(model.vae, list(range(5 * 10**6, 5 * 10**6 + 128)))
    assert 0.9 < float((means * model.vae.config.scaling_factor).std()) < 1.1


def test_the_shipped_classifier_reads_toy_world_pictures():
    # Fresh seeds, never trained on. The subject metric needs shape, colour and pattern read
    # right together; 0.9 per attribute keeps chance agreement with a wrong subject small.
    net = evaluate.load_classifier(TOY / evaluate.CLASSIFIER_FILE)
    acc = evaluate.accuracy(net, range(9 * 10**6, 9 * 10**6 + 300))
    assert min(acc.values()) >= 0.9, acc


def test_entropy_is_zero_for_one_value_and_one_for_all_values_equally():
    colours = toyworld.ATTRIBUTES["colour"]
    assert evaluate.entropy(["red"] * 8, colours) == 0
    assert evaluate.entropy(list(colours), colours) == pytest.approx(1)


def test_scores_count_the_subject_only_when_shape_colour_and_pattern_all_match():
    subject = {"shape": "star", "colour": "purple", "pattern": "dotted"}
    hit = {**subject, "background": "blue"}
    near = {**hit, "pattern": "plain"}
    s = evaluate.scores([hit, near], [near, {**hit, "shape": "circle"}], subject, "star")
    assert s["subject_fidelity"] == 0.5
    assert s["subject_attributes"] == {"shape": 1.0, "colour": 1.0, "pattern": 0.5}
    assert s["class_shape_rate"] == 0.5
    assert s["language_drift"] == 0.5


def test_the_demo_learns_the_subject_and_prior_preservation_keeps_the_class_prompt(tmp_path, example_photos):
    """The demo's settings (config/config.yaml) on the committed model, evaluated on the 32 dev
    seeds (evaluate.SEED_SETS: held out from the class images; the test seeds are for reported
    numbers, docs/quality.md, which also says how the recipe was chosen on these seeds).

    Measured on the dev seeds (2026-12-01, the model pretrained on an H200 that day, the demo's
    800 steps at lr 5e-5 / 4.5e-4 and prior_loss_weight 0.5, 1 thread): the base model draws the
    purple dotted star for "a photo of zxq star" in 0.00 of 32 seeds and, told "a photo of a purple
    dotted star" in words, in 0.84; the demo finetune reaches 0.88, purple in 0.97, the subject
    on a new background in 0.81 (background as asked 1.00), class colour entropy 0.80, language
    drift 0.00. Recipes differ by up to 0.1-0.15 with the training seed or the thread count (one
    seed is 0.03). Asserted: fidelity at least 0.65 and above the base model's; purple in at
    least 0.7 of the subject samples; the subject on other backgrounds in at least 0.6, which
    are drawn as asked; class samples still stars in several colours (8 colours drawn equally
    often give entropy 1, one colour 0); and the class prompt turns into the subject in at most
    0.2 of the seeds. The same with prior_loss_weight 0 (test seeds: fidelity 0.70, language
    drift 0.75, colour entropy 0.13) turns the class prompt into the subject and into nearly one
    colour: asserted, drift at least 0.3 above the demo's and entropy at least 0.4 below.
    """
    _, chars = config.load(yaml.safe_load((ROOT / "config/config.yaml").read_text()), ROOT)
    c = chars["example"]
    model, tokenizer = str(ROOT / c["base_model"]), str(ROOT / c["tokenizer"])
    instance = tmp_path / "instance"
    prepare.run(example_photos, instance, 64, c["prepare"]["mode"], "white", c["instance_prompt"])
    ci = c["class_images"]
    class_images.run(model, tokenizer, tmp_path / "class", tmp_path / "class.json", ci["num_class_images"],
                     ci["class_prompt"], "", ci["sampler"], ci["steps"], ci["guidance_scale"], 64)
    settings = {**config.train_settings(c), "sample_every_n_steps": 0}

    def finetune_and_evaluate(name, **change):
        trained = train.run(model, tokenizer, [(instance, tmp_path / "class.json")], {**settings, **change},
                            tmp_path / name / "state", tmp_path / name, tmp_path / name / "trained.safetensors")
        return evaluate.run(trained, model, tokenizer, TOY / evaluate.CLASSIFIER_FILE, instance,
                            tmp_path / name / "evaluation.json", c["instance_prompt"], ci["class_prompt"],
                            c["class_word"], evaluate.SEED_SETS["dev"], evaluate.STEPS, evaluate.GUIDANCE)

    r = finetune_and_evaluate("demo")
    no_prior = finetune_and_evaluate("no-prior", prior_loss_weight=0.0)["after"]
    assert r["subject"] == {"shape": "star", "colour": "purple", "pattern": "dotted"}
    assert json.loads((tmp_path / "demo" / "evaluation.json").read_text()) == r
    before, after = r["before"], r["after"]
    assert after["subject_fidelity"] >= 0.65, r
    assert after["subject_fidelity"] > before["subject_fidelity"], r
    assert after["subject_attributes"]["colour"] >= 0.7, r
    assert after["recontext_both"] >= 0.6 and after["recontext_background"] >= 0.8, r
    assert after["class_shape_rate"] >= 0.5, r
    assert after["class_colour_entropy"] >= 0.6, r
    assert after["language_drift"] <= max(0.2, before["language_drift"]), r
    # Prior preservation matters: without it the class prompt turns into the subject and loses
    # its colours (test seeds: drift 0.75 against 0.03, colour entropy 0.13 against 0.74).
    assert no_prior["language_drift"] >= after["language_drift"] + 0.3, (no_prior, after)
    assert no_prior["class_colour_entropy"] <= after["class_colour_entropy"] - 0.4, (no_prior, after)
