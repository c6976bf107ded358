# Input functions and values shared by the rules. Every value that shapes a stage's output reaches
# its rule as a plain params entry, so Snakemake reruns exactly the stale steps. Every value in a
# shell command is quoted ({x:q}); a params entry that is several arguments is built here with
# shlex.join (tests/test_shell_safety.py lists them).
import json
import re
import shlex
import yaml
from argparse import Namespace

from dreampipe import class_images as dpclass
from dreampipe import gpu_slots as dpgpu
from dreampipe import prepare as dpprepare


wildcard_constraints:
    character="|".join(map(re.escape, CHARACTERS)) or "NONE",


TINY_MODEL = f"{R}/base/tiny-sd.safetensors"
TINY_TOKENIZER = f"{R}/base/tiny-sd-tokenizer"


def char(wildcards):
    return CHARACTERS[wildcards.character]


def photo_subject(photos, c):
    """The subject whose prepared photos `photos` (instance/<i>) are, or None for the character's
    own class photos (class_photos)."""
    return (
        None if photos == "class_photos" else c["subjects"][int(photos.split("/")[1])]
    )


def photo_dir(wildcards):
    s = photo_subject(wildcards.photos, char(wildcards))
    return s["instance_dir"] if s else char(wildcards)["class_images"]["class_data"]


def prepare_masks(wildcards):
    """Subject masks are prepared for a subject's photos under train.masked_loss (class photos are
    never masked)."""
    return (
        wildcards.photos != "class_photos" and char(wildcards)["train"]["masked_loss"]
    )


def photo_caption(wildcards):
    s = photo_subject(wildcards.photos, char(wildcards))
    return (
        s["instance_prompt"] if s else char(wildcards)["class_images"]["class_prompt"]
    )


def prepared_class_prompt(wildcards):
    s = photo_subject(wildcards.prepared, char(wildcards))
    return s["class_prompt"] if s else char(wildcards)["class_images"]["class_prompt"]


def base_model(wildcards):
    m = char(wildcards)["base_model"]
    return TINY_MODEL if m == dpconfig.TINY else m


def base_model_files(wildcards):
    """The base model's files as inputs: a diffusers folder is its files, so rewriting the
    weights inside it reruns what it shaped (a folder's own mtime does not change then).
    """
    return dpconfig.model_files(base_model(wildcards))


def base_fallback(wildcards):
    """The checkpoint supplying what the base model lacks (VAE, text encoder), or none."""
    return [f for f in [char(wildcards)["base_model_fallback"]] if f]


def base_options(wildcards):
    """How every command that loads the base model reads it (checkpoint.load's use_ema, fallback)."""
    c = char(wildcards)
    return shlex.join(
        (["--use-ema"] if c["use_ema"] else [])
        + [
            arg
            for f in base_fallback(wildcards)
            for arg in ["--base-model-fallback", f]
        ]
    )


def tokenizer(wildcards):
    c = char(wildcards)
    if c["tokenizer"]:
        return c["tokenizer"]
    return TINY_TOKENIZER if c["base_model"] == dpconfig.TINY else ""


def tokenizer_arg(wildcards):
    t = tokenizer(wildcards)
    return shlex.join(["--tokenizer", t]) if t else ""


def train_gpus(wildcards):
    """The GPUs training takes (train.devices; auto is one): Snakemake counts them against
    --resources gpu, and the SLURM plugin asks sbatch --gpus for as many."""
    return dpgpu.needed(char(wildcards)["train"]["devices"])


def instance_dirs(wildcards):
    """The prepared photos of each subject of the character."""
    return [
        f"{R}/{wildcards.character}/instance/{i}"
        for i in range(len(char(wildcards)["subjects"]))
    ]


def class_set(c, s):
    """The shared store of class images for subject s of character c."""
    ci = c["class_images"]
    model = c["base_model"]
    cache = Path(R) / ".cache" / "model-hashes.json"
    # what the loaded base model is: its content, the EMA choice and the fallback's content
    model_id = "+".join(
        ["tiny-sd-v1" if model == dpconfig.TINY else dpconfig.model_id(model, cache)]
        + ["ema"] * c["use_ema"]
        + [dpconfig.model_id(f, cache) for f in [c["base_model_fallback"]] if f]
    )
    return str(
        dpclass.set_dir(
            f"{R}/class",
            model_id,
            s["class_prompt"],
            ci["negative_prompt"],
            ci["sampler"],
            ci["steps"],
            ci["guidance_scale"],
            c["prepare"]["resolution"],
        )
    )


def class_source(c):
    """generate, instance, none, prior_prediction or folder; a clear error names the character
    file otherwise."""
    return dpclass.source(
        c["class_images"]["class_data"],
        Path(CFG["characters_dir"]) / f"{c['name']}.yaml",
    )


def class_manifests(wildcards):
    """One class manifest per subject, in the order of instance_dirs."""
    c = char(wildcards)
    source = class_source(c)
    # prior_prediction: no class images, the base UNet's prediction is the prior
    if source in ("none", "prior_prediction"):
        return []
    if source == "generate":
        n = c["class_images"]["num_class_images"]
        return [f"{class_set(c, s)}/n{n}.json" for s in c["subjects"]]
    if source == "instance":
        return [
            f"{R}/{c['name']}/instance/{i}.class.json"
            for i in range(len(c["subjects"]))
        ]
    return [f"{R}/{c['name']}/class_photos.class.json"] * len(c["subjects"])


def _class_sets():
    """{set folder name: what the class_images rule needs} over the selected characters."""
    sets = {}
    for c in CHARACTERS.values():
        ci = c["class_images"]
        if class_source(c) != "generate":
            continue
        wc = Namespace(character=c["name"])
        for s in c["subjects"]:
            sets[Path(class_set(c, s)).name] = {
                "model": [*base_model_files(wc), *base_fallback(wc)],
                "args": shlex.join(
                    [
                        "--model",
                        base_model(wc),
                        "--store",
                        class_set(c, s),
                        "--prompt",
                        s["class_prompt"],
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
                )
                + " "
                + base_options(wc),
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


EXPORTS = (
    [exported(Namespace(character=c)) for c in CHARACTERS]
    + [
        f"{R}/{c}/{c}-diffusers"
        for c, settings in CHARACTERS.items()
        if settings["export"]["diffusers"]
    ]
    + [  # the LoRA a lora run trained, or one extracted from a full finetune (rule export_lora)
        f"{R}/{c}/{c}.lora.safetensors"
        for c, settings in CHARACTERS.items()
        if settings["train"]["method"] == "lora" or settings["export"]["lora_rank"]
    ]
)


def export_settings(wildcards):
    """What an exported file's metadata records: the subjects and the settings that shaped the weights."""
    c = char(wildcards)
    return json.dumps(
        {
            "subjects": [
                {k: s[k] for k in ("token", "class_word", "instance_prompt")}
                for s in c["subjects"]
            ],
            **dpconfig.split_train_settings(c)[0],
        }
    )


def toy_classifier(c):
    path = (
        Path(base_model(Namespace(character=c["name"]))).parent
        / "attributes.safetensors"
    )
    return str(path) if path.is_file() else None


EVALUATED = [name for name, c in CHARACTERS.items() if toy_classifier(c)]
