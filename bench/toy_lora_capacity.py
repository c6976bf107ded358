"""How much of a full finetune the layers a LoRA trains can hold, on the toy world: the finetune's
change extracted as a LoRA (`dreampipe extract-lora`: kohya's layers, at these ranks), merged into
the base model, and scored by evaluate.py as bench/toy_recipes.py scores a recipe; then the same with
parts of the finetune a LoRA never trains put back (the text encoder's token embeddings, or its
whole text encoder). Prints a markdown table, a row as each model is scored.

    PYTHONPATH=workflow python bench/toy_recipes.py --out results/bench/toy-recipes --recipes 1
    PYTHONPATH=workflow python bench/toy_lora_capacity.py results/bench/toy-recipes/ours--demo-config-/model.safetensors \\
        --instance results/bench/toy-recipes/instance --seed-set dev
"""

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))

from dreampipe import checkpoint, config, evaluate, lora  # noqa: E402

KEYS = ["subject_fidelity", "class_shape_rate", "class_colour_entropy", "class_pattern_entropy", "language_drift",
        "recontext_background", "recontext_both"]
# (name, rank, conv rank, what of the finetune's text encoder is put back: None, "embeddings" or "all")
ROWS = [("the full finetune itself", None, None, None),
        ("extracted at rank 16", 16, None, None),
        ("extracted at rank 32", 32, None, None),
        ("extracted at rank 32, 3x3 convs at 32 (LoCon)", 32, 32, None),
        ("extracted at rank 16, + the finetune's token embeddings", 16, None, "embeddings"),
        ("extracted at rank 32, + the finetune's token embeddings", 32, None, "embeddings"),
        ("extracted at rank 32, convs at 32, + the finetune's whole text encoder", 32, 32, "all")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("finetuned", help="a full finetune of the toy base model (toy_recipes.py's model.safetensors)")
    p.add_argument("--instance", required=True, help="the prepared instance folder it was trained on")
    p.add_argument("--out", default="results/bench/toy-lora-capacity")
    p.add_argument("--seed-set", choices=["dev", "test"], default="dev",
                   help="held-out seeds (evaluate.SEED_SETS); the finetune's recipe was chosen on the dev seeds")
    p.add_argument("--seeds", type=int, help="only the first this many seeds of the set")
    a = p.parse_args()
    out = Path(a.out)
    _, chars = config.load(yaml.safe_load((ROOT / "config/config.yaml").read_text()), ROOT)
    c = chars["example"]
    base, tokenizer = str(ROOT / c["base_model"]), str(ROOT / c["tokenizer"])
    ci = c["class_images"]
    print("| model | " + " | ".join(KEYS) + " |")
    print("|---" * (1 + len(KEYS)) + "|", flush=True)
    for name, rank, conv_rank, text in ROWS:
        slug = "".join(ch if ch.isalnum() else "-" for ch in name)
        (out / slug).mkdir(parents=True, exist_ok=True)
        path = Path(a.finetuned)
        if rank:
            layers = lora.load(lora.run(a.finetuned, base, out / slug / "extracted.lora.safetensors", rank, conv_rank,
                                        dtype=None, log=lambda line: None))
            model = checkpoint.load(base, tokenizer=tokenizer)
            lora.merge(model, {k: (d.float(), u.float(), alpha) for k, (d, u, alpha) in layers.items()})
            finetuned = checkpoint.load(a.finetuned, tokenizer=tokenizer).text_encoder
            if text == "all":
                model.text_encoder.load_state_dict(finetuned.state_dict())
            elif text == "embeddings":
                with torch.no_grad():
                    model.text_encoder.get_input_embeddings().weight.copy_(finetuned.get_input_embeddings().weight)
            path = checkpoint.save(model, out / slug / "model.safetensors", dtype=None)
        r = evaluate.run(path, base, tokenizer, Path(base).parent / evaluate.CLASSIFIER_FILE, Path(a.instance),
                         out / slug / "evaluation.json", c["instance_prompt"], ci["class_prompt"], c["class_word"],
                         evaluate.SEED_SETS[a.seed_set][:a.seeds], evaluate.STEPS, evaluate.GUIDANCE)
        print(f"| {name} | " + " | ".join(evaluate.cell(r["after"], k) for k in KEYS) + " |", flush=True)


if __name__ == "__main__":
    main()
