# dreampipe: photos of a character -> DreamBooth-finetuned Stable Diffusion 1.x model.
#   snakemake --cores 1 --resources gpu=1
# Only the standard library, yaml and our config module are imported here, so dry runs are instant.
import sys

from snakemake.utils import min_version

min_version("9.19")  # pyproject.toml's floor: the first to read profiles/*/profile.yaml


include: "workflow/rules/package.smk"


from dreampipe import config as dpconfig
from dreampipe.errors import DreampipeError


configfile: "config/config.yaml"


# The image of --sdm apptainer: `make image` builds it from the Dockerfile (README, "Deploy").
container: "docker-daemon://dreampipe:0.1.0"


report: "workflow/report/workflow.rst"


try:
    CFG, CHARACTERS = dpconfig.load(config)
except DreampipeError as e:
    sys.exit(f"dreampipe: error: {e}")

R = CFG["results"]


# Seconds of work each: on a cluster they run in the main Snakemake process, not as jobs.
localrules:
    settings,
    tiny_model,


include: "workflow/rules/common.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/class_images.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        EXPORTS,
        expand(f"{R}/{{character}}/samples/final.png", character=CHARACTERS),
        expand(f"{R}/{{character}}/settings.yaml", character=CHARACTERS),
        expand(f"{R}/{{character}}/evaluation.json", character=EVALUATED),
