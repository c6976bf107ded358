"""Checkpoint formats: every SD 1.x layout users have loads, the export is what the UIs load."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dreampipe import checkpoint, cli, export, prune
from dreampipe.errors import DreampipeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network: record any attempt (libraries may swallow errors)."""
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(path, tokenizer, LDM state dict, metadata) of the tiny model file."""
    path, tokenizer = tiny_model
    sd, meta = checkpoint.read_state_dict(path)
    return path, tokenizer, sd, meta


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def fat_lightning_ckpt(sd: dict, meta: dict, path):
    """What a CompVis-era training run saves: weights, a flattened EMA copy, schedule buffers,
    optimizer state, and the callback state that sd-v1-4.ckpt keys by the ModelCheckpoint class
    (plus, as dreampipe's own .ckpt files do, the tiny model's architecture metadata)."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in sd.items()
           if k.startswith(checkpoint.UNET_PREFIX)}
    state_dict = {**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
                  "betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.ones(1000)}
    torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6,
                "pytorch-lightning_version": "1.4.2", "metadata": meta,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 1e-6, "params": [0]}]}],
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25), "dirpath": "logs"}}},
               path)
    return path


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,suffix", [("fp32", ".safetensors"), ("fp16", ".safetensors"),
                                          ("bf16", ".safetensors"), ("fp16", ".ckpt")])
def test_ldm_file_to_model_to_ldm_file_is_bit_exact_with_identical_keys(tiny, tmp_path, dtype, suffix, device):
    """On a GPU too: training loads the base model straight onto it, and writes frozen networks from there."""
    path, tokenizer, sd, meta = tiny
    source = checkpoint.write_file(sd, tmp_path / f"in{suffix}", dtype, meta)
    out = checkpoint.save(checkpoint.load(source, tokenizer, device=device), tmp_path / f"out{suffix}", dtype)
    original, _ = checkpoint.read_state_dict(source)
    assert_same_tensors(checkpoint.read_state_dict(out)[0], original)
    assert original[checkpoint.UNET_PREFIX + "out.2.weight"].dtype == checkpoint.DTYPES[dtype]


def test_diffusers_folder_to_export_to_load_gives_identical_weights(tiny, tmp_path):
    path, tokenizer, sd, _ = tiny
    folder = export.run(path, tmp_path / "model-diffusers", "fp32", tokenizer)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    exported = export.run(folder, tmp_path / "again.safetensors", "fp32")
    assert_same_tensors(checkpoint.read_state_dict(exported)[0], sd)
    assert_same_tensors(checkpoint.to_ldm(checkpoint.load(exported, tokenizer)), sd)


def test_diffusers_folder_with_only_fp16_variant_files_loads(tiny, tmp_path):
    path, tokenizer, sd, _ = tiny
    folder = export.run(path, tmp_path / "model-diffusers", "fp16", tokenizer)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = checkpoint.to_ldm(checkpoint.load(folder))
    assert_same_tensors(loaded, {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()})


def test_exported_file_read_by_diffusers_own_converters_gives_identical_weights(tiny, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    path, tokenizer, _, _ = tiny
    model = checkpoint.load(path, tokenizer)
    out, _ = checkpoint.read_state_dict(export.run(path, tmp_path / "x.safetensors", "fp32", tokenizer))
    assert_same_tensors(convert_ldm_unet_checkpoint(out, model.unet.config), model.unet.state_dict())
    assert_same_tensors(convert_ldm_vae_checkpoint(out, model.vae.config), model.vae.state_dict())
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(out).items()}
    assert torch.equal(text.pop("embeddings.position_ids"), torch.arange(77)[None])
    assert_same_tensors(text, model.text_encoder.state_dict())


def test_sd1_size_export_has_the_real_sd1_key_set_shapes_and_size():
    """Full SD 1.x architecture on the meta device: no weights are allocated."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = checkpoint.sd1_architecture()
    with torch.device("meta"):
        model = checkpoint.StableDiffusion(UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"]),
                                           CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])), None, arch)
    ldm = checkpoint.to_ldm(model)
    count = lambda prefix: sum(k.startswith(prefix) for k in ldm)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."),
            count("cond_stage_model.transformer.text_model.")) == (686, 248, 197)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    d, f, c = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
    assert shapes[d + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes[d + "input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes[d + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes[d + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    assert shapes[d + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[d + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[d + "time_embed.0.weight"] == (1280, 320)
    assert shapes[d + "out.2.weight"] == (4, 320, 3, 3)
    assert shapes[f + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[f + "decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes[f + "quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes[c + "embeddings.token_embedding.weight"] == (49408, 768)
    assert ldm[c + "embeddings.position_ids"].dtype == torch.int64
    # diffusers' reader maps every key back onto the full-size networks, shapes included
    for module, converted in ((model.unet, convert_ldm_unet_checkpoint(ldm, model.unet.config)),
                              (model.vae, convert_ldm_vae_checkpoint(ldm, model.vae.config))):
        assert {k: tuple(v.shape) for k, v in converted.items()} == \
               {k: tuple(v.shape) for k, v in module.state_dict().items()}
    fp16_bytes = sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in ldm.values())
    assert 2.13e9 < fp16_bytes < 2.135e9  # v1-5-pruned-emaonly-fp16: 2.13 GB


def test_export_metadata_holds_the_training_settings(tiny, tmp_path):
    path, tokenizer, _, _ = tiny
    settings = {"token": "zxq", "class_word": "robot", "learning_rate": 1e-6, "max_steps": 800}
    out = export.run(path, tmp_path / "zxq.safetensors", "fp16", tokenizer, settings)
    _, meta = checkpoint.read_state_dict(out)
    assert json.loads(meta["dreampipe.settings"]) == settings
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_the_export_log_tells_the_size_written_and_its_seconds_apart_from_start_up(tiny, tmp_path):
    """`export done in` counts the imports too; this line counts reading, casting and writing only."""
    import re

    path, tokenizer, _, _ = tiny
    log = tmp_path / "export.log"
    subprocess.run([sys.executable, "-m", "dreampipe.cli", "export", str(path), str(tmp_path / "zxq.safetensors"),
                    "--log", str(log)], env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")}, check=True)
    assert re.search(r"export: [\d.]+ MiB written to \S+zxq.safetensors in [\d.]+ s\n", log.read_text())


# ---------------------------------------------------------------------------------------------
# checkpoint variants


@pytest.mark.parametrize("use_ema", [False, True])
def test_lightning_ckpt_with_ema_and_optimizer_loads_the_chosen_unet(tiny, tmp_path, use_ema):
    path, tokenizer, sd, meta = tiny
    fat = fat_lightning_ckpt(sd, meta, tmp_path / "sd-v1-4-like.ckpt")
    loaded = checkpoint.to_ldm(checkpoint.load(fat, tokenizer, use_ema=use_ema))
    shift = 1 if use_ema else 0
    assert_same_tensors(loaded, {k: v + shift if k.startswith(checkpoint.UNET_PREFIX) and v.is_floating_point()
                                 else v for k, v in sd.items()})


@pytest.mark.parametrize("use_ema", [False, True])
def test_prune_keeps_only_the_chosen_inference_weights_in_fp16(tiny, tmp_path, use_ema):
    path, _, sd, meta = tiny
    fat = fat_lightning_ckpt(sd, meta, tmp_path / "fat.ckpt")
    out = tmp_path / "pruned.safetensors"
    assert cli.main(["prune", str(fat), str(out)] + (["--ema"] if use_ema else [])) == 0
    pruned, meta = checkpoint.read_state_dict(out)
    shift = 1 if use_ema else 0
    assert_same_tensors(pruned, {k: (v + shift if k.startswith(checkpoint.UNET_PREFIX) else v).half()
                                 if v.is_floating_point() else v for k, v in sd.items()})
    assert meta[checkpoint.ARCHITECTURE_KEY]  # the tiny model stays loadable
    assert out.stat().st_size < fat.stat().st_size / 3


def peak_memory_mb(code: str) -> float:
    """Peak resident memory of a fresh Python running `code` (VmHWM: ru_maxrss would count the
    memory of this test process, which the child is forked from)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "OMP_NUM_THREADS": "1"}
    report = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    r = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_prune_streams_a_fat_file_tensor_by_tensor_in_bounded_memory(tiny, tmp_path, suffix):
    """A fat file of 840 MB (16 large UNet tensors, their EMA copies): prune holds a tensor or two
    at a time, not the file (the old prune needed more than the file's size above its imports)."""
    from safetensors.torch import save_file

    path, _, sd, meta = tiny
    big = {f"{checkpoint.UNET_PREFIX}extra.{i}.weight": torch.full((2560, 2560), float(i)) for i in range(16)}
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in big.items()}
    fat = tmp_path / f"fat{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": {**sd, **big, **ema}, "metadata": meta, "global_step": 7}, fat)
    else:
        save_file({**sd, **big, **ema}, str(fat), metadata=meta)
    del big, ema
    size_mb = fat.stat().st_size / 2**20
    assert size_mb > 800

    out = tmp_path / "pruned.safetensors"
    imports = peak_memory_mb("from dreampipe import cli, prune")
    pruning = peak_memory_mb(f"from dreampipe import cli\nassert cli.main(['prune', {str(fat)!r}, {str(out)!r}]) == 0")
    assert pruning - imports < 0.35 * size_mb, f"{pruning - imports:.0f} MB above the imports for a {size_mb:.0f} MB file"
    pruned, _ = checkpoint.read_state_dict(out)
    assert pruned[f"{checkpoint.UNET_PREFIX}extra.15.weight"].dtype == torch.float16
    assert torch.equal(pruned[f"{checkpoint.UNET_PREFIX}extra.15.weight"], torch.full((2560, 2560), 15.0).half())
    assert len(pruned) == len(sd) + 16


def test_prune_asked_for_ema_of_a_file_without_one_is_one_clear_error(tiny, tmp_path):
    path, _, _, _ = tiny
    with pytest.raises(DreampipeError) as e:
        prune.run(path, tmp_path / "out.safetensors", use_ema=True)
    one_line_error(e, str(path), "use_ema", "model_ema")


def test_text_encoder_saved_by_old_transformers_loads(tiny, tmp_path):
    """sd-v1-4-era files lack the text_model. level in cond_stage_model.transformer.*."""
    path, tokenizer, sd, meta = tiny
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    source = checkpoint.write_file(old, tmp_path / "old.safetensors", "fp32", meta)
    assert_same_tensors(checkpoint.to_ldm(checkpoint.load(source, tokenizer)), sd)


def test_broken_float_position_ids_are_rebuilt(tiny, tmp_path):
    path, _, sd, meta = tiny
    key = checkpoint.TEXT_PREFIX + "text_model.embeddings.position_ids"
    broken = {**sd, key: sd[key].float() - 0.01}
    out = prune.run(checkpoint.write_file(broken, tmp_path / "b.safetensors", "fp32", meta), tmp_path / "p.safetensors")
    assert torch.equal(checkpoint.read_state_dict(out)[0][key], torch.arange(77)[None])


def test_file_without_vae_takes_it_from_the_fallback(tiny, tmp_path):
    path, tokenizer, sd, meta = tiny
    no_vae = {k: v for k, v in sd.items() if not k.startswith(checkpoint.VAE_PREFIX)}
    source = checkpoint.write_file(no_vae, tmp_path / "unet-only.safetensors", "fp32", meta)
    assert_same_tensors(checkpoint.to_ldm(checkpoint.load(source, tokenizer, fallback=path)), sd)


# ---------------------------------------------------------------------------------------------
# refused files: each one clear error


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_ckpt_whose_pickle_would_run_code_is_refused_and_the_code_does_not_run(tiny, tmp_path, container):
    _, _, sd, _ = tiny
    marker = tmp_path / "code-ran"
    bad = tmp_path / "evil.ckpt"
    payload = {"state_dict": sd, "extra": RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(bad)
    one_line_error(e, str(bad), "refused")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_one_clear_error(tiny, tmp_path, suffix):
    _, _, sd, meta = tiny
    full = checkpoint.write_file(sd, tmp_path / f"full{suffix}", "fp16", meta)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(cut)
    one_line_error(e, str(cut), "truncated")


@pytest.mark.parametrize("name,content", [("photo.ckpt", b"\x89PNG\r\n\x1a\n" + bytes(64)),
                                          ("notes.safetensors", b"just some text, not tensors")])
def test_wrong_file_type_is_one_clear_error(tmp_path, name, content):
    wrong = tmp_path / name
    wrong.write_bytes(content)
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(wrong)
    one_line_error(e, str(wrong))


def sd2_like(sd):
    """SD 2.x: OpenCLIP text encoder under cond_stage_model.model.*, 1024-wide cross-attention."""
    out = {k: v for k, v in sd.items() if not k.startswith(checkpoint.TEXT_PREFIX)}
    out["cond_stage_model.model.token_embedding.weight"] = torch.zeros(8, 1024)
    for k, v in sd.items():
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            out[k] = torch.zeros(v.shape[0], 1024)
    return out


@pytest.mark.parametrize("variant", ["SD 2.x", "SD 2.x UNet only", "SDXL", "inpainting"])
def test_other_model_families_are_refused_naming_what_was_found(tiny, tmp_path, variant):
    _, tokenizer, sd, _ = tiny  # no architecture metadata: judged against the SD 1.x shapes
    unet_in = checkpoint.UNET_PREFIX + "input_blocks.0.0.weight"
    files = {
        "SD 2.x": sd2_like(sd),
        "SD 2.x UNet only": {k: v for k, v in sd2_like(sd).items() if k.startswith(checkpoint.UNET_PREFIX)},
        "SDXL": {**sd, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)},
        "inpainting": {**sd, unet_in: torch.zeros(32, 9, 3, 3)},
    }
    source = checkpoint.write_file(files[variant], tmp_path / "other.safetensors", "fp16")
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(source, tokenizer)
    found = {"SD 2.x": "2.x", "SD 2.x UNet only": "2.x", "SDXL": "SDXL", "inpainting": "9 input channels"}
    one_line_error(e, str(source), found[variant], "1.x")


def test_sd2_diffusers_folder_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024,
                                                              "use_linear_projection": True}))
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(tmp_path)
    one_line_error(e, str(tmp_path), "2.x")


def test_missing_vae_keys_without_fallback_is_one_clear_error(tiny, tmp_path):
    _, tokenizer, sd, meta = tiny
    no_vae = {k: v for k, v in sd.items() if not k.startswith(checkpoint.VAE_PREFIX)}
    source = checkpoint.write_file(no_vae, tmp_path / "unet-only.safetensors", "fp16", meta)
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(source, tokenizer)
    one_line_error(e, str(source), "VAE", "base_model_fallback")


def test_diffusers_folder_whose_pickled_weights_would_run_code_is_one_clear_error(tiny, tmp_path):
    path, tokenizer, _, _ = tiny
    folder = export.run(path, tmp_path / "model-diffusers", "fp32", tokenizer)
    marker = tmp_path / "code-ran"
    [weights] = (folder / "unet").glob("*.safetensors")
    torch.save({"extra": RunsCode(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(DreampipeError) as e:
        checkpoint.load(folder)
    one_line_error(e, str(folder), "UNet", ".safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("out", ["m.safetensors", "m.ckpt", "m-diffusers"])
def test_exported_models_get_the_mode_the_umask_gives(tiny, tmp_path, umask, out):
    import os

    path, tokenizer, _, _ = tiny
    old = os.umask(umask)
    try:
        written = export.run(path, tmp_path / out, "fp16", tokenizer)
    finally:
        os.umask(old)
    files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
