# dreampipe: photos of a character -> DreamBooth-finetuned Stable Diffusion 1.x model.
#   snakemake --cores 1 --resources gpu=1
# Only the standard library, yaml and our config module are imported here, so dry runs are instant.
import os
import sys

# Parse time and every job use this workflow's own copy of the dreampipe package.
PACKAGE_DIR = str(Path(workflow.basedir) / "workflow")
sys.path.insert(0, PACKAGE_DIR)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_DIR, os.environ.get("PYTHONPATH")]))
from dreampipe import config as dpconfig
from dreampipe.errors import DreampipeError


configfile: "config/config.yaml"


try:
    CFG, CHARACTERS = dpconfig.load(config)
except DreampipeError as e:
    sys.exit(f"dreampipe: error: {e}")

R = CFG["results"]


include: "workflow/rules/common.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/class_images.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/sample.smk"


rule all:
    input:
        EXPORTS,
        expand(f"{R}/{{character}}/samples/final.png", character=CHARACTERS),
