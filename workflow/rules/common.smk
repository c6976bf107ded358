# Input functions and values shared by the rules. Every value that shapes a stage's output reaches
# its rule as a plain params entry, so Snakemake reruns exactly the stale steps.
import json
import shlex
import yaml
from argparse import Namespace

from dreampipe import class_images as dpclass
from dreampipe import prepare as dpprepare


wildcard_constraints:
    character="|".join(CHARACTERS) or "NONE",


TINY_MODEL = f"{R}/base/tiny-sd.safetensors"
TINY_TOKENIZER = f"{R}/base/tiny-sd-tokenizer"


def char(wildcards):
    return CHARACTERS[wildcards.character]


def base_model(wildcards):
    m = char(wildcards)["base_model"]
    return TINY_MODEL if m == dpconfig.TINY else m


def tokenizer(wildcards):
    c = char(wildcards)
    if c["tokenizer"]:
        return c["tokenizer"]
    return TINY_TOKENIZER if c["base_model"] == dpconfig.TINY else ""


def tokenizer_arg(wildcards):
    t = tokenizer(wildcards)
    return f"--tokenizer {t}" if t else ""


def class_set(c):
    """The shared store of class images for character c's settings."""
    ci = c["class_images"]
    model = c["base_model"]
    model_id = (
        "tiny-sd-v1"
        if model == dpconfig.TINY
        else dpconfig.model_id(model, Path(R) / ".cache" / "model-hashes.json")
    )
    return str(
        dpclass.set_dir(
            f"{R}/class",
            model_id,
            ci["class_prompt"],
            ci["negative_prompt"],
            ci["sampler"],
            ci["steps"],
            ci["guidance_scale"],
            c["prepare"]["resolution"],
        )
    )


def class_manifest(wildcards):
    c = char(wildcards)
    if c["class_images"]["class_data"] == "none":
        return []
    return f"{class_set(c)}/n{c['class_images']['num_class_images']}.json"


def _class_sets():
    """{set folder name: what the class_images rule needs} over the selected characters."""
    sets = {}
    for c in CHARACTERS.values():
        ci = c["class_images"]
        if ci["class_data"] != "generate":
            continue
        wc = Namespace(character=c["name"])
        sets[Path(class_set(c)).name] = {
            "model": base_model(wc),
            "args": shlex.join(
                [
                    "--model",
                    base_model(wc),
                    "--store",
                    class_set(c),
                    "--prompt",
                    ci["class_prompt"],
                    "--negative-prompt",
                    ci["negative_prompt"],
                    "--sampler",
                    ci["sampler"],
                    "--steps",
                    str(ci["steps"]),
                    "--guidance-scale",
                    str(ci["guidance_scale"]),
                    "--resolution",
                    str(c["prepare"]["resolution"]),
                    "--batch-size",
                    str(ci["batch_size"]),
                ]
                + (["--tokenizer", tokenizer(wc)] if tokenizer(wc) else [])
            ),
        }
    return sets


CLASS_SETS = _class_sets()


# Characters on the toy base model are evaluated with the attribute classifier beside it.
def toy_classifier(c):
    path = (
        Path(base_model(Namespace(character=c["name"]))).parent
        / "attributes.safetensors"
    )
    return str(path) if path.is_file() else None


EVALUATED = [name for name, c in CHARACTERS.items() if toy_classifier(c)]
