"""dreampipe: DreamBooth for Stable Diffusion 1.x as a Snakemake workflow."""

__version__ = "0.1.0"
