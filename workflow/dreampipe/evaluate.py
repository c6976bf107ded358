"""Evaluate: how well a finetuned toy-world model learned its subject, and what it forgot.

A small attribute classifier, trained on the toy world (toyworld.py) and shipped beside the toy
base model, reads shape, colour, pattern and background off any 64 px picture. The subject is
what the classifier sees in the character's own training images (majority vote), so no config
has to restate it. From fixed seeds, before (base model) and after (finetuned):

- subject fidelity: share of "<instance prompt>" samples showing the subject's shape, colour and
  pattern together;
- prior preservation: class-prompt samples still show the class, and as many colours and patterns
  as the base model drew (normalised entropy, 1 = uniform);
- language drift: share of class-prompt samples that turned into the subject (colour and pattern);
- recontextualisation: "<instance prompt> on a green background" (and other colours) samples show
  the background asked for, and the subject on it (the DreamBooth paper's prompt fidelity).

Every rate comes with its Wilson 95 % interval. The seeds are held out: never those of a class
image, and split into a development set (for choosing recipes and thresholds) and a test set
(the reported numbers, what the workflow's evaluate rule uses).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from . import toyworld
from .files import write_json

CLASSIFIER_FILE = "attributes.safetensors"
SUBJECT_KEYS = ("shape", "colour", "pattern")
# Class image i is drawn from seed i (class_images.py) and the config schema caps
# num_class_images below 10**6, so no evaluation sample repeats a class image's noise.
SEED_SETS = {"dev": range(10**6, 10**6 + 32), "test": range(10**6 + 32, 10**6 + 96)}
# How every figure is sampled (DDIM steps, guidance), the workflow's evaluation and the recipe
# comparison in docs/quality.md alike, so the two read the same numbers for the same model.
STEPS, GUIDANCE = 20, 5.0
GRID_SEEDS = 16  # the grid shows the first seeds (a sheet to look at); the numbers count them all


class AttributeClassifier(torch.nn.Module):
    """Five convolutions (four strided), average and max pooled, one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width // 2, width, 2 * width, 2 * width, 2 * width]
        layers = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [torch.nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(4 * width, len(values))
                                          for name, values in toyworld.ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[dict]:
        from .sampling import from_pil

        self.eval()
        x = from_pil([im.convert("RGB").resize((64, 64), Image.BILINEAR) for im in images])
        logits = self(x.to(next(self.parameters()).device))
        return [{name: toyworld.ATTRIBUTES[name][int(logits[name][i].argmax())] for name in logits}
                for i in range(len(images))]


def save_classifier(net: AttributeClassifier, path: Path) -> Path:
    from safetensors.torch import save_file

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file({k: v.half().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return Path(path)


def load_classifier(path: Path) -> AttributeClassifier:
    from safetensors.torch import load_file

    net = AttributeClassifier()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def accuracy(net: AttributeClassifier, seeds: range) -> dict:
    """Per attribute, the share of toy-world pictures of these seeds read correctly."""
    examples = [toyworld.example(s) for s in seeds]
    return agreement(net.predict([im for im, _, _ in examples]), [t for _, t, _ in examples])[0]


def agreement(preds: list[dict], things: list[toyworld.Thing]) -> tuple[dict, dict]:
    """Per attribute, the share of predictions that match the things, and its Wilson 95 % interval."""
    hits = {k: sum(p[k] == getattr(t, k) for p, t in zip(preds, things)) for k in toyworld.ATTRIBUTES}
    return ({k: h / len(things) for k, h in hits.items()},
            {k: list(wilson(h, len(things))) for k, h in hits.items()})


def prompt_agreement(model, net: AttributeClassifier, seeds: list[int], *, steps: int,
                     guidance_scale: float) -> tuple[dict, list[Image.Image], list[toyworld.Thing]]:
    """A model's samples of fully described things ("a photo of a red striped star on a blue
    background"), the thing of seed s drawn as toyworld.example(s) would and sampled from seed s:
    per attribute, the share the classifier reads as asked ("prompt_agreement", with "ci95"), a
    lower bound of the model's accuracy (a miss is the model's or the classifier's)."""
    from . import sampling

    things = [toyworld.sample(random.Random(s)) for s in seeds]
    images = sampling.generate(model, [t.caption() for t in things], seeds, resolution=64, steps=steps,
                               guidance_scale=guidance_scale)
    rates, ci95 = agreement(net.predict(images), things)
    return {"prompt_agreement": rates, "ci95": ci95}, images, things


def entropy(values: list[str], universe: tuple) -> float:
    """Normalised Shannon entropy: 0 = always the same value, 1 = all values equally often."""
    counts = Counter(values)
    h = -sum(c / len(values) * math.log(c / len(values)) for c in counts.values())
    return abs(h / math.log(len(universe)))  # abs: no -0.0


def subject_of(preds: list[dict]) -> dict:
    return {k: Counter(p[k] for p in preds).most_common(1)[0][0] for k in SUBJECT_KEYS}


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a rate hits/n: unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n hits, the usual case with a few dozen seeds."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def matches(preds: list[dict], subject: dict, keys=SUBJECT_KEYS) -> list[bool]:
    """Which predictions match the subject in all of `keys`."""
    return [all(p[k] == subject[k] for k in keys) for p in preds]


def share(preds: list[dict], subject: dict, keys=SUBJECT_KEYS) -> float:
    """The share of predictions that match the subject in all of `keys`."""
    hits = matches(preds, subject, keys)
    return sum(hits) / len(hits)


def recontext_prompts(instance_prompt: str, subject: dict, n: int) -> list[tuple[str, str]]:
    """n (prompt, background) pairs, "<instance prompt> on a red background", cycling through the
    toy world's colours except the subject's own (the toy world never draws a thing on its own
    colour) and white, the padding colour of prepared photos. The instance prompt never names a
    background, so each is a context the identifier was not trained with."""
    colours = [c for c in toyworld.COLOURS if c not in (subject["colour"], "white")]
    return [(toyworld.on_background(instance_prompt, colours[i % len(colours)]), colours[i % len(colours)])
            for i in range(n)]


def scores(instance: list[dict], klass: list[dict], subject: dict, class_word: str,
           recontext: list[tuple[dict, str]] = ()) -> dict:
    """Rates and entropies of one model's samples, with a Wilson 95 % interval ("ci95") next to
    every rate. `recontext`: (prediction, background asked for) pairs."""
    rates = {"subject_fidelity": matches(instance, subject),
             "class_shape_rate": [p["shape"] == class_word for p in klass],
             "language_drift": matches(klass, subject, ("colour", "pattern"))}
    if recontext:
        background = [p["background"] == asked for p, asked in recontext]
        fidelity = matches([p for p, _ in recontext], subject)
        rates |= {"recontext_background": background, "recontext_subject": fidelity,
                  "recontext_both": [a and b for a, b in zip(background, fidelity)]}
    attributes = {k: matches(instance, subject, [k]) for k in SUBJECT_KEYS}
    return {
        **{k: sum(v) / len(v) for k, v in rates.items()},
        "subject_attributes": {k: sum(v) / len(v) for k, v in attributes.items()},
        "class_colour_entropy": entropy([p["colour"] for p in klass], toyworld.ATTRIBUTES["colour"]),
        "class_pattern_entropy": entropy([p["pattern"] for p in klass], toyworld.ATTRIBUTES["pattern"]),
        "ci95": {**{k: list(wilson(sum(v), len(v))) for k, v in rates.items()},
                 "subject_attributes": {k: list(wilson(sum(v), len(v))) for k, v in attributes.items()}},
    }


def run(model_path, base_model_path, tokenizer, classifier_path: Path, instance_dir: Path,
        out: Path, instance_prompt: str, class_prompt: str, class_word: str, seeds: list[int],
        steps: int, guidance_scale: float, grid_path: Path | None = None, base_options: dict | None = None) -> dict:
    """Score base and finetuned model on the same seeds (SEED_SETS: "test" for reported numbers);
    write JSON and a markdown table. "described" is the reference: the base model prompted with
    the subject in words, about the best fidelity to expect of it without finetuning."""
    from . import sampling
    from .images import grid, save_atomic

    net = load_classifier(classifier_path)
    manifest = json.loads((Path(instance_dir) / "manifest.json").read_text())
    instance_preds = net.predict([Image.open(Path(instance_dir) / m["file"]) for m in manifest])
    subject = subject_of(instance_preds)
    seeds = list(seeds)
    recontext = recontext_prompts(instance_prompt, subject, len(seeds))
    result = {"subject": subject, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
              "described_prompt": toyworld.photo_of(**subject),
              "recontext_prompts": [p for p, _ in recontext],
              "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale}
    pictures = []

    def draw(model, label, prompts):
        prompts = [prompts] * len(seeds) if isinstance(prompts, str) else prompts
        images = sampling.generate(model, prompts, seeds, resolution=64, steps=steps,
                                   guidance_scale=guidance_scale)
        pictures.extend((im, f"{label}: {p} #{s}") for im, p, s in list(zip(images, prompts, seeds))[:GRID_SEEDS])
        return net.predict(images)

    for label, path, options in (("before", base_model_path, base_options), ("after", model_path, None)):
        model = sampling.load(path, tokenizer, options)
        placed = zip(draw(model, label, [p for p, _ in recontext]), [c for _, c in recontext])
        result[label] = scores(draw(model, label, instance_prompt), draw(model, label, class_prompt),
                               subject, class_word, list(placed))
        if label == "before":
            described = matches(draw(model, "base", result["described_prompt"]), subject)
            result["described"] = sum(described) / len(described)
            result["ci95"] = {"described": list(wilson(sum(described), len(described)))}
    write_json(result, Path(out))
    Path(out).with_suffix(".md").write_text(markdown(result))
    if grid_path:
        save_atomic(grid([p for p, _ in pictures], [t for _, t in pictures], columns=min(len(seeds), GRID_SEEDS)),
                    grid_path)
    return result


ROWS = [("subject fidelity (shape+colour+pattern) ↑", "subject_fidelity"),
        ("class prompt draws the class ↑", "class_shape_rate"),
        ("class colour diversity (entropy) ↑", "class_colour_entropy"),
        ("class pattern diversity (entropy) ↑", "class_pattern_entropy"),
        ("language drift (class looks like subject) ↓", "language_drift"),
        ("new context: background as asked ↑", "recontext_background"),
        ("new context: subject fidelity ↑", "recontext_subject"),
        ("new context: both ↑", "recontext_both")]


def cell(scored: dict, key: str) -> str:
    """"0.25 [0.15, 0.37]": the rate and its Wilson 95 % interval; entropies have none."""
    if key not in scored["ci95"]:
        return f"{scored[key]:.2f}"
    lo, hi = scored["ci95"][key]
    return f"{scored[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown(result: dict) -> str:
    b, a = result["before"], result["after"]
    s = result["subject"]
    lines = [f"Subject read from the training images: {s['colour']} {s['pattern']} {s['shape']}. "
             f"{len(result['seeds'])} seeds ({result['seeds'][0]}-{result['seeds'][-1]}), {result['steps']} DDIM "
             f"steps, guidance {result['guidance_scale']}. Rates with their Wilson 95 % interval.", "",
             "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {cell(b, k)} | {cell(a, k)} |" for name, k in ROWS if k in b]
    lines += ["", f"Reference: the base model prompted \"{result['described_prompt']}\" draws the subject "
              f"in {cell(result, 'described')} of the seeds.",
              f"New contexts: \"{result['recontext_prompts'][0]}\" and the other colours in turn."]
    return "\n".join(lines) + "\n"
