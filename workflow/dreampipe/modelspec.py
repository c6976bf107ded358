"""The `modelspec.*` metadata every .safetensors we write carries (Stability AI's ModelSpec 1.0.1,
https://github.com/Stability-AI/ModelSpec), as kohya's sd-scripts writes it for SD 1.x
(library/sai_model_spec.py): UIs and model sites read the title, architecture, resolution and date
from the header without loading a tensor.

- architecture: `stable-diffusion-v1`, or `stable-diffusion-v1/lora` for a LoRA file.
- implementation: what the tensor names follow. sd-scripts writes the Stability AI repository for
  SD checkpoints (LDM keys) and `diffusers` for SD 1.x LoRAs (kohya names are diffusers module paths).
- hash_sha256: `0x` + the SHA-256 of every byte after the header (8-byte length + JSON), i.e. the
  tensors' data as laid out in the file; the spec's own example computes it so. checkpoint.write_file
  fills it in while writing (the header is written with a placeholder of the same length, then
  patched), so a file costs one pass. For LoRA files `sshs_model_hash` carries the same digest
  without `0x`: AUTOMATIC1111 takes it as the LoRA's hash (its "addnet" hash, computed the same way)
  instead of reading the file. Metadata changes do not change the hash: only the tensors count.
- date: when the file was written (UTC, ISO 8601). It is in the file only, never in a rule's
  params, so it makes nothing stale.

Standard library only: checkpoint.py, the Snakefile's imports and train.py all may use it.
"""

from __future__ import annotations

import hashlib
import json
import time

SPEC_VERSION = "1.0.1"
ARCHITECTURE = "stable-diffusion-v1"
IMPLEMENTATION = {"checkpoint": "https://github.com/Stability-AI/generative-models", "lora": "diffusers"}
HASH_KEY = "modelspec.hash_sha256"
ADDNET_HASH_KEY = "sshs_model_hash"
# The value write_file replaces with the digest; the same length as a digest, so the header keeps its length.
PENDING = "0x" + "0" * 64
HASH_FORMATS = {HASH_KEY: "0x{}", ADDNET_HASH_KEY: "{}"}


def metadata(title: str, *, lora: bool = False, resolution: int | None = 512, prediction_type: str = "epsilon",
             settings: dict | None = None, date: float | None = None) -> dict[str, str]:
    """The modelspec keys of a checkpoint (or, `lora`, a LoRA file) titled `title`; `settings`,
    when given, go to `dreampipe.settings` as JSON and their subjects' instance prompts to
    `modelspec.trigger_phrase`. The hashes are left PENDING for checkpoint.write_file."""
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE + ("/lora" if lora else ""),
        "modelspec.implementation": IMPLEMENTATION["lora" if lora else "checkpoint"],
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(date)),
        "modelspec.prediction_type": prediction_type,
        HASH_KEY: PENDING,
    }
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    if lora:
        meta[ADDNET_HASH_KEY] = PENDING
    if settings is not None:
        meta["dreampipe.settings"] = json.dumps(settings, sort_keys=True)
        prompts = [s["instance_prompt"] for s in settings.get("subjects", []) if s.get("instance_prompt")]
        if prompts:
            meta["modelspec.trigger_phrase"] = ", ".join(prompts)
    return meta


def data_hash(path) -> str:
    """SHA-256 (hex) of a .safetensors file's bytes after its header: what HASH_KEY holds (with 0x)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
