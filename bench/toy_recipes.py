"""DreamBooth recipes on the toy world: the demo's settings, the plain diffusers recipe, ours
without prior preservation, and a few variations, each trained from the toy base model on the
example photos with the same class images, steps and seeds, and scored by evaluate.py. Prints a
markdown table, a row as each recipe finishes.

    PYTHONPATH=workflow python bench/toy_recipes.py [--out results/bench/toy-recipes] [--recipes 3]
    PYTHONPATH=workflow python bench/toy_recipes.py --seed-set dev --recipe 'lr 2e-4={"learning_rate": 2e-4}'

A recipe is a change to the demo's train settings; "num_class_images" in it changes the class
images too (the first n of one store, so recipes share them); "class_data": "prior_prediction"
trains with no class images, the base model's prediction for the class prompt as the prior target.
"method": "lora" trains a LoRA, with the config's lora_* settings unless the recipe changes them:

    PYTHONPATH=workflow python bench/toy_recipes.py --seed-set dev \
        --recipe 'lora r16={"method": "lora", "lora_rank": 16, "lora_alpha": 16, "lora_learning_rate": 5e-4}'
"""

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))

from dreampipe import class_images, config, evaluate, example_photos, lora_training, prepare, train  # noqa: E402

# diffusers examples/dreambooth/train_dreambooth.py defaults (with --with_prior_preservation)
DIFFUSERS = {"learning_rate": 5e-6, "lr_scheduler": "constant", "lr_warmup_steps": 0,
             "adam_weight_decay": 1e-2, "max_grad_norm": 1.0, "prior_loss_weight": 1.0,
             "train_text_encoder": False, "batch_size": 1}


def recipes(demo: dict) -> dict:
    """The issue's comparison first, then the variations that told most in choosing the demo's
    settings on the dev seeds (docs/quality.md): the UNet's rate, the steps, the text encoder."""
    steps = demo["max_steps"]
    return {
        "ours (demo config)": {},
        "diffusers recipe": DIFFUSERS,
        "ours, prior_loss_weight 0": {"prior_loss_weight": 0.0},
        "ours, UNet lr x3": {"learning_rate": demo["learning_rate"] * 3},
        f"ours, {steps // 2} steps": {"max_steps": steps // 2},
        f"ours, {steps * 2} steps": {"max_steps": steps * 2},
        "ours, frozen text encoder": {"train_text_encoder": False},
        "ours, prior_loss_weight 3": {"prior_loss_weight": 3.0},
        "ours, prior_prediction": {"class_data": "prior_prediction"},
    }


def named_change(text: str) -> tuple[str, dict]:
    name, _, change = text.partition("=")
    return name, json.loads(change)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/bench/toy-recipes")
    p.add_argument("--seed-set", choices=["dev", "test"], default="test",
                   help="held-out seeds (evaluate.SEED_SETS): dev to choose recipes, test for the reported numbers")
    p.add_argument("--seeds", type=int, help="only the first this many seeds of the set")
    p.add_argument("--steps", type=int, help="train every recipe this many steps (default: as each says)")
    p.add_argument("--recipes", type=int, help="only the first this many recipes (3: the demo's, the diffusers "
                   "example's and ours without prior preservation)")
    p.add_argument("--recipe", action="append", type=named_change, metavar="NAME=JSON",
                   help="run this recipe (a change to the demo's settings) instead of the list; repeatable")
    p.add_argument("--base-model", help="a pretrained toy model folder (toy-sd.safetensors, tokenizer/, "
                   "attributes.safetensors); default: the example character's base model")
    a = p.parse_args()
    out = Path(a.out)
    _, chars = config.load(yaml.safe_load((ROOT / "config/config.yaml").read_text()), ROOT)
    c = chars["example"]
    model, tokenizer = str(ROOT / c["base_model"]), str(ROOT / c["tokenizer"])
    if a.base_model:
        model, tokenizer = str(Path(a.base_model) / "toy-sd.safetensors"), str(Path(a.base_model) / "tokenizer")
    classifier = Path(model).parent / evaluate.CLASSIFIER_FILE
    example_photos.write(out / "photos")
    prepare.run(out / "photos", out / "instance", 64, c["prepare"]["mode"], "white", c["instance_prompt"])
    ci = c["class_images"]

    def class_manifest(count: int) -> Path:
        manifest = out / f"class-{count}.json"
        class_images.run(model, tokenizer, out / "class", manifest, count, ci["class_prompt"], "", ci["sampler"],
                         ci["steps"], ci["guidance_scale"], 64)
        return manifest

    demo = config.train_settings(c)
    chosen = dict(a.recipe) if a.recipe else dict(list(recipes(demo).items())[:a.recipes])
    keys = ["subject_fidelity", "class_shape_rate", "class_colour_entropy", "class_pattern_entropy", "language_drift",
            "recontext_background", "recontext_both"]
    print("| recipe | steps | lr (UNet / text encoder) | prior_loss_weight | train s | " + " | ".join(keys) + " |")
    print("|---" * (5 + len(keys)) + "|", flush=True)
    rows = []
    for name, change in chosen.items():
        slug = "".join(ch if ch.isalnum() else "-" for ch in name)
        change = dict(change)
        prior_prediction = change.pop("class_data", "generate") == config.PRIOR_PREDICTION
        manifest = None if prior_prediction else class_manifest(change.pop("num_class_images", ci["num_class_images"]))
        # a recipe of the other train.method gets that method's settings from the config
        # (train_settings leaves them out)
        method = change.get("method", demo["method"])
        settings = {**config.method_settings({**c["train"], **demo}, method), **change, "sample_every_n_steps": 0,
                    **({"max_steps": a.steps} if a.steps else {}),
                    **({"prior_prediction": [ci["class_prompt"]]} if prior_prediction else {})}
        start = time.perf_counter()
        trained = train.run(model, tokenizer, [(out / "instance", manifest)], settings,
                            out / slug / "state", out / slug, out / slug / "model.safetensors")
        seconds = time.perf_counter() - start
        r = evaluate.run(trained, model, tokenizer, classifier, out / "instance", out / slug / "evaluation.json",
                         c["instance_prompt"], ci["class_prompt"], c["class_word"],
                         evaluate.SEED_SETS[a.seed_set][:a.seeds], evaluate.STEPS, evaluate.GUIDANCE,
                         out / slug / "evaluation.png")
        if not rows:
            print("| base model (before) | 0 | - | - | - | "
                  + " | ".join(evaluate.cell(r["before"], k) for k in keys) + " |")
        rows.append((name, settings, {**r, "train_seconds": seconds}))
        unet_lr, te_lr = lora_training.rates(settings)
        te = f" / {te_lr:g}" if settings["train_text_encoder"] and te_lr else " / frozen"
        print(f"| {name} | {settings['max_steps']} | {unet_lr:g}{te} | "
              f"{settings['prior_loss_weight']:g} | {seconds:.0f} | "
              + " | ".join(evaluate.cell(r["after"], k) for k in keys) + " |", flush=True)
        (out / "summary.json").write_text(json.dumps([{"recipe": n, "settings": s, **r} for n, s, r in rows], indent=1))
    print(f"\nReference: the base model prompted \"{rows[0][2]['described_prompt']}\": subject fidelity "
          f"{evaluate.cell(rows[0][2], 'described')}")


if __name__ == "__main__":
    main()
