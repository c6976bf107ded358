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


def photo_dir(wildcards):
    c = char(wildcards)
    return (
        c["instance_dir"]
        if wildcards.photos == "instance"
        else c["class_images"]["class_data"]
    )


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


def class_source(c):
    """generate, instance, none or folder; a clear error names the character file otherwise."""
    return dpclass.source(
        c["class_images"]["class_data"],
        Path(CFG["characters_dir"]) / f"{c['name']}.yaml",
    )


def class_manifest(wildcards):
    c = char(wildcards)
    source = class_source(c)
    if source == "none":
        return []
    if source == "generate":
        return f"{class_set(c)}/n{c['class_images']['num_class_images']}.json"
    prepared = "instance" if source == "instance" else "class_photos"
    return f"{R}/{c['name']}/{prepared}.class.json"


def _class_sets():
    """{set folder name: what the class_images rule needs} over the selected characters."""
    sets = {}
    for c in CHARACTERS.values():
        ci = c["class_images"]
        if class_source(c) != "generate":
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
                ]
                + (["--tokenizer", tokenizer(wc)] if tokenizer(wc) else [])
            ),
            "batch_size": str(ci["batch_size"]),
        }
    return sets


try:
    CLASS_SETS = _class_sets()
except DreampipeError as e:
    sys.exit(f"dreampipe: error: {e}")


def exported(wildcards):
    """The character's exported single file, of the type export.format names."""
    return f"{R}/{wildcards.character}/{wildcards.character}.{char(wildcards)['export']['format']}"


EXPORTS = [exported(Namespace(character=c)) for c in CHARACTERS] + [
    f"{R}/{c}/{c}-diffusers"
    for c, settings in CHARACTERS.items()
    if settings["export"]["diffusers"]
]
