"""The base model of the end-to-end GPU benchmarks: random weights with the SD 1.x architecture,
fp16, in the SD single-file layout, and a tokenizer beside it (kept if already there).

    python bench/sd1_base.py DIR [--size tiny]   # DIR/sd1-random.safetensors, DIR/tokenizer
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import random_sd1  # noqa: E402

from dreampipe import checkpoint, tiny  # noqa: E402


def write(out: Path, size: str = "sd1") -> tuple[Path, Path]:
    """out/sd1-random.safetensors and out/tokenizer, made unless there; their paths."""
    model, tokenizer = out / "sd1-random.safetensors", out / "tokenizer"
    if not model.exists():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(random_sd1(size=size), model, dtype="fp16")
        tiny.write_tokenizer(tokenizer)
    return model, tokenizer


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", choices=["sd1", "tiny"], default="sd1")
    a = p.parse_args()
    write(a.out, a.size)
