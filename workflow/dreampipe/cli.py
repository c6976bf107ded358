"""`dreampipe <stage>`: every stage of the workflow as a command (the Snakemake rules call these)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import DreampipeError

log = logging.getLogger("dreampipe")
# The traceback of an unexpected error goes to the --log file only: the terminal gets one line.
traceback_log = logging.getLogger("dreampipe.traceback")
traceback_log.propagate = False
traceback_log.addHandler(logging.NullHandler())
FORMAT = "%(asctime)s %(name)s: %(message)s"
GPU_COMMANDS = {"class-images", "train", "sample", "evaluate"}


def _setup_logging(logfile: str | None) -> None:
    # DDP starts ranks 1.. by running this command again, --log included: they add their lines to
    # the same file after "rank N", and rank 0 empties it first but appends too, so that no rank
    # writes over the lines of another.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    fmt = FORMAT.replace("%(name)s", f"rank {rank} %(name)s") if rank else FORMAT
    handlers = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        if not rank:
            open(logfile, "w").close()
        handlers.append(logging.FileHandler(logfile, mode="a"))
        handlers[-1].setFormatter(logging.Formatter(fmt))
        traceback_log.addHandler(handlers[-1])
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers)
    for noisy in ("diffusers", "transformers", "pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric|diffusers|transformers")


def base_options(a) -> dict:
    """How checkpoint.load reads the base model (--use-ema, --base-model-fallback)."""
    return {"use_ema": a.use_ema, "fallback": a.base_model_fallback}


def add_base_options(sp) -> None:
    sp.add_argument("--use-ema", action="store_true", help="take the base model's UNet from its EMA weights")
    sp.add_argument("--base-model-fallback", help="full SD 1.x checkpoint supplying the VAE/text encoder "
                                                  "that the base model lacks")


def cmd_tiny_model(a):
    from . import tiny

    tiny.build(Path(a.out), Path(a.tokenizer))


def cmd_example_photos(a):
    from . import example_photos

    example_photos.write(Path(a.out))


def cmd_pretrain_toy(a):
    from . import pretrain

    pretrain.run(Path(a.out), json.loads(a.settings), a.stages)


def cmd_evaluate(a):
    from . import evaluate

    steps = evaluate.STEPS if a.steps is None else a.steps
    guidance = evaluate.GUIDANCE if a.guidance_scale is None else a.guidance_scale
    evaluate.run(a.model, a.base_model, a.tokenizer, Path(a.classifier), Path(a.instance_dir), Path(a.out),
                 a.instance_prompt, a.class_prompt, a.class_word, evaluate.SEED_SETS[a.seed_set], steps, guidance,
                 a.grid and Path(a.grid), base_options=base_options(a))


def cmd_prepare(a):
    from . import prepare

    manifest = prepare.run(Path(a.instance_dir), Path(a.out), a.resolution, a.mode, a.background,
                           a.instance_prompt, a.gravity, a.on_bad_image, a.workers, masks=a.masks)
    log.info("prepared %d images into %s", len(manifest), a.out)


def cmd_class_images(a):
    from . import class_images

    if a.prepared:
        files = class_images.from_prepared(Path(a.prepared), Path(a.manifest), a.prompt)
        log.info("%d class images from %s", len(files), a.prepared)
        return
    if not (a.model and a.num):
        raise DreampipeError("--store needs --model and --num (or give --prepared instead)")
    made = class_images.run(a.model, a.tokenizer, Path(a.store), Path(a.manifest), a.num, a.prompt,
                            a.negative_prompt, a.sampler, a.steps, a.guidance_scale, a.resolution,
                            a.batch_size if a.batch_size == "auto" else int(a.batch_size), log=log.info,
                            base_options=base_options(a))
    log.info("made %d new class images", len(made))


def cmd_train(a):
    from . import train

    if a.class_manifest and len(a.class_manifest) != len(a.instance_dir):
        raise DreampipeError("train: give one --class-manifest per --instance-dir, or none")
    subjects = [(Path(d), Path(m) if m else None)
                for d, m in zip(a.instance_dir, a.class_manifest or [None] * len(a.instance_dir))]
    settings = train_settings(a)
    if a.gpus:  # the job's GPUs are now CUDA_VISIBLE_DEVICES 0..n-1, whichever host GPUs a list named
        settings["devices"] = len(a.gpus)
    train.run(a.model, a.tokenizer, subjects, settings, Path(a.state), Path(a.workdir), Path(a.out),
              base_options=base_options(a))


def train_settings(a) -> dict:
    return {**json.loads(a.settings), **json.loads(a.untracked_settings)}


def take_gpus(a) -> list[int] | None:
    """The GPU slots of a GPU command (gpu_slots): training takes train.devices of them, the others one."""
    from . import gpu_slots

    gpus = gpu_slots.acquire(gpu_slots.lock_dir(), train_settings(a)["devices"] if a.command == "train" else 1)
    if gpus is not None:
        log.info("using GPU %s", ",".join(map(str, gpus)))
    return gpus


def cmd_export(a):
    from . import export

    export.run(Path(a.trained), Path(a.out), a.dtype, a.tokenizer, json.loads(a.settings), log=log.info)


def cmd_extract_lora(a):
    from . import lora

    lora.run(Path(a.finetuned), Path(a.base), Path(a.out), a.rank, a.conv_rank, a.dtype,
             base_options=base_options(a), settings=json.loads(a.settings), log=log.info)


def cmd_prune(a):
    from . import prune

    out = prune.run(Path(a.src), Path(a.out), a.ema, a.dtype)
    log.info("pruned %s (%.2f GB) to %s (%.2f GB)", a.src, Path(a.src).stat().st_size / 1e9, out,
             out.stat().st_size / 1e9)


def cmd_sample(a):
    from . import sample

    sample.run(a.model, Path(a.out), a.prompt, a.seeds, a.resolution, steps=a.steps, guidance_scale=a.guidance_scale,
               sampler=a.sampler, tokenizer=a.tokenizer, base_model=a.base_model, base_options=base_options(a),
               log=log.info)


def cmd_check_report(a):
    from . import report_check

    problems = report_check.run(Path(a.report), Path(a.out))
    for problem in problems:
        log.error("%s", problem)
    if problems:
        raise DreampipeError(f"{a.report}: {len(problems)} image(s) do not display")
    log.info("every image of %s displays; screenshot: %s", a.report, Path(a.out) / "report.png")


def cmd_config_docs(a):
    from . import config

    Path(a.out).write_text(config.reference_markdown())


def unexpected(e: Exception, logfile: str | None) -> str:
    """One line for an error that is not a known user mistake: what happened and where to read more."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        what = f"no space left on the disk{f' writing {e.filename}' if e.filename else ''}; free some space and run it again"
    else:
        what = f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return what + (f"; the traceback is in {logfile}" if logfile else
                   "; run it again with --log FILE to keep the traceback")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dreampipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        sp.add_argument("--log", help="also write the log to this file")
        return sp

    sp = add("tiny-model", cmd_tiny_model, "build the tiny SD-architecture demo model")
    sp.add_argument("out")
    sp.add_argument("--tokenizer", required=True, help="folder to write its tokenizer to")

    sp = add("example-photos", cmd_example_photos, "write the example character's photos")
    sp.add_argument("out")

    sp = add("pretrain-toy", cmd_pretrain_toy, "pretrain the toy-world base model (models/toy-sd)")
    sp.add_argument("out", nargs="?", default="models/toy-sd")
    sp.add_argument("--settings", default="{}", help='JSON overriding pretrain.DEFAULTS (and pretrain.GPU_SETTINGS '
                    'on a GPU), e.g. {"unet_steps": 800}')
    sp.add_argument("--stages", nargs="+", default=["vae", "unet", "classifier", "check"],
                    choices=["vae", "unet", "classifier", "check"],
                    help="each stage reads what the one before wrote to OUT (pretrain.STAGES)")

    sp = add("evaluate", cmd_evaluate, "subject fidelity, prior preservation, language drift (toy world)")
    sp.add_argument("model")
    sp.add_argument("--base-model", required=True)
    sp.add_argument("--tokenizer")
    sp.add_argument("--classifier", required=True, help="attributes.safetensors beside the toy model")
    sp.add_argument("--instance-dir", required=True, help="prepared instance images (manifest.json)")
    sp.add_argument("--out", required=True, help="evaluation.json (a .md beside it)")
    sp.add_argument("--instance-prompt", required=True)
    sp.add_argument("--class-prompt", required=True)
    sp.add_argument("--class-word", required=True)
    sp.add_argument("--seed-set", choices=["dev", "test"], default="test",
                    help="held-out seeds: dev to choose recipes and thresholds, test for the reported numbers")
    sp.add_argument("--steps", type=int, help="DDIM steps (default: evaluate.STEPS, those of docs/quality.md)")
    sp.add_argument("--guidance-scale", type=float, help="(default: evaluate.GUIDANCE)")
    sp.add_argument("--grid", help="also write the scored pictures as a grid")
    add_base_options(sp)

    sp = add("prepare", cmd_prepare, "photos -> square training images + manifest + contact sheet")
    sp.add_argument("instance_dir")
    sp.add_argument("out")
    sp.add_argument("--resolution", type=int, default=512)
    sp.add_argument("--mode", default="pad", choices=["pad", "crop", "stretch"])
    sp.add_argument("--background", default="white")
    sp.add_argument("--instance-prompt", required=True)
    sp.add_argument("--gravity", default="center", help="part kept by crop, place of the photo in pad",
                    choices=["center", "north", "south", "east", "west", "north_west", "north_east",
                             "south_west", "south_east"])
    sp.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    sp.add_argument("--workers", type=int, default=1, help="photos prepared in parallel")
    sp.add_argument("--masks", action="store_true",
                    help="also prepare each photo's subject mask (name.mask.png beside it, or its transparency)")

    sp = add("class-images", cmd_class_images, "generate the missing class images of a set")
    sp.add_argument("--model")
    sp.add_argument("--tokenizer")
    source = sp.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="folder of the class set to generate into")
    source.add_argument("--prepared", help="use the images of this prepared folder instead")
    sp.add_argument("--manifest", required=True, help="JSON listing the class images")
    sp.add_argument("--num", type=int, help="how many images of --store")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--negative-prompt", default="")
    sp.add_argument("--sampler", default="ddim", choices=["ddim", "dpmsolver++"])
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--guidance-scale", type=float, default=10.0)
    sp.add_argument("--resolution", type=int, default=512)
    sp.add_argument("--batch-size", default="auto")
    add_base_options(sp)

    sp = add("train", cmd_train, "DreamBooth finetuning (resumes from --state)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--tokenizer")
    sp.add_argument("--instance-dir", required=True, action="append", help="prepared photos; once per subject")
    sp.add_argument("--class-manifest", action="append", help="class images of the subject; once per subject")
    sp.add_argument("--settings", required=True, help="JSON of the train settings")
    sp.add_argument("--untracked-settings", default="{}", help="JSON of the train settings that do not "
                    "shape the weights (config.NON_SHAPING_SETTINGS), which Snakemake does not track")
    sp.add_argument("--state", required=True, help="resumable state folder")
    sp.add_argument("--workdir", required=True, help="folder for samples and loss logs")
    sp.add_argument("--out", required=True)
    add_base_options(sp)

    sp = add("export", cmd_export, "write the model as a pruned single-file checkpoint")
    sp.add_argument("trained")
    sp.add_argument("out", help="*.safetensors or *.ckpt: LDM single file; other: diffusers folder (a LoRA "
                    "file: dreampipe extract-lora)")
    sp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    sp.add_argument("--tokenizer")
    sp.add_argument("--settings", default="{}", help="JSON stored in the file's metadata")

    sp = add("extract-lora", cmd_extract_lora, "a LoRA file (kohya layout) of a finetune against its base model")
    sp.add_argument("finetuned", help="the finetuned SD 1.x model: file or diffusers folder")
    sp.add_argument("base", help="the model it was finetuned from")
    sp.add_argument("out", help="*.safetensors")
    sp.add_argument("--rank", type=int, help="rank of the attention layers (and of linears and 1x1 convs with "
                    "--conv-rank); not needed for a model train.method lora wrote, whose LoRA is written as trained")
    sp.add_argument("--conv-rank", type=int, help="also the ResNet blocks' layers, 3x3 convs at this rank (LoCon)")
    sp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    sp.add_argument("--settings", default="{}", help="JSON stored in the file's metadata (its resolution: "
                    "modelspec.resolution)")
    add_base_options(sp)

    sp = add("prune", cmd_prune, "cut a fat SD 1.x checkpoint down to its inference weights")
    sp.add_argument("src", help="SD 1.x .ckpt or .safetensors (with optimizer state, EMA copy...)")
    sp.add_argument("out", help="*.safetensors (or *.ckpt)")
    sp.add_argument("--ema", action="store_true", help="keep the EMA weights of the UNet instead")
    sp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])

    sp = add("sample", cmd_sample, "a grid of prompts x seeds from a model")
    sp.add_argument("model")
    sp.add_argument("--out", required=True)
    sp.add_argument("--prompt", action="append", required=True)
    sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    sp.add_argument("--resolution", type=int, default=512)
    sp.add_argument("--sampler", default="dpmsolver++", choices=["ddim", "dpmsolver++"])
    sp.add_argument("--steps", type=int, default=25)
    sp.add_argument("--guidance-scale", type=float, default=7.5)
    sp.add_argument("--tokenizer")
    sp.add_argument("--base-model", help="also sample this model, above (before/after)")
    add_base_options(sp)

    sp = add("check-report", cmd_check_report, "check that every image of a report displays (Chromium)")
    sp.add_argument("report", nargs="?", default="results/report.html")
    sp.add_argument("--out", default="results/report-check", help="folder for the screenshot")

    sp = add("config-docs", cmd_config_docs, "write config/README.md from the schemas")
    sp.add_argument("out", nargs="?", default="config/README.md")

    a = p.parse_args(argv)
    _setup_logging(a.log)
    from . import lifetime

    lifetime.end_with_workflow()
    start = time.time()
    try:
        a.gpus = take_gpus(a) if a.command in GPU_COMMANDS else None
        a.func(a)
    except DreampipeError as e:
        log.error("%s: error: %s", a.command, e)
        return 1
    except Exception as e:
        log.error("%s: error: %s", a.command, unexpected(e, a.log))
        traceback_log.error("%s failed", a.command, exc_info=True)
        return 1
    log.info("%s done in %.1f s", a.command, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
