"""LoRA files in kohya's layout: the names sd-scripts gives SD 1.x, diffusers' own loader reads them
to the same model as our merge, extraction from a finetune, and the files' metadata."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreampipe import checkpoint, lora, modelspec
from dreampipe.errors import DreampipeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sd1_networks():
    """The full SD 1.x UNet and text encoder, on the meta device (shapes, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = checkpoint.sd1_architecture()
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(arch["unet"]),
                CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])))


def kohya_names(net, part, conv=False):
    return {lora.kohya_name(part, name) for name in lora.targets(net, part, conv)}


def test_sd1_layer_names_and_counts_are_those_of_sd_scripts(sd1_networks):
    """sd-scripts (networks/lora.py) prints "create LoRA for Text Encoder: 72 modules" and
    "create LoRA for U-Net: 192 modules" for SD 1.x, 278 with conv_dim (LoCon)."""
    unet, text_encoder = sd1_networks
    unet_names, te_names = kohya_names(unet, "unet"), kohya_names(text_encoder, "text_encoder")
    assert (len(unet_names), len(te_names)) == (192, 72)
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_mid_block_attentions_0_proj_in",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"} <= unet_names
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te_text_model_encoder_layers_11_self_attn_out_proj",
            "lora_te_text_model_encoder_layers_11_mlp_fc2"} <= te_names
    assert all(n.startswith("lora_unet_") for n in unet_names) and all(n.startswith("lora_te_") for n in te_names)

    locon = lora.targets(unet, "unet", conv=True)
    names = {lora.kohya_name("unet", n) for n in locon}
    assert len(names) == 278 and unet_names < names
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_unet_mid_block_resnets_1_time_emb_proj"} <= names
    # 3x3 convs take conv_rank, 1x1 convs and linears the rank
    assert locon["down_blocks.0.resnets.0.conv1"] and not locon["down_blocks.1.resnets.0.conv_shortcut"]
    assert not locon["mid_block.resnets.1.time_emb_proj"] and not locon["mid_block.attentions.0.proj_in"]
    assert sum(locon.values()) == 50


def random_layers(model, rank=2, alpha=1.0, seed=0, conv_rank=None):
    """Nonzero random LoRA layers for every attention (and, with conv_rank, conv) layer of the model."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for part in lora.PREFIXES:
        net = getattr(model, part)
        for name, wide in lora.targets(net, part, conv=conv_rank is not None).items():
            weight = net.get_submodule(name).weight
            r = conv_rank if wide else rank
            if weight.dim() == 2:
                down, up = torch.randn(r, weight.shape[1], generator=g), torch.randn(weight.shape[0], r, generator=g)
            else:
                down = torch.randn(r, *weight.shape[1:], generator=g)
                up = torch.randn(weight.shape[0], r, 1, 1, generator=g)
            layers[lora.kohya_name(part, name)] = (down * 0.1, up * 0.1, alpha)
    return layers


def test_save_and_load_round_trip_the_layers_with_their_alpha(tiny_model, tmp_path):
    path, tokenizer = tiny_model
    model = checkpoint.load(path, tokenizer=tokenizer)
    layers = random_layers(model, rank=4, alpha=1.5, conv_rank=2)
    out = lora.save(layers, tmp_path / "x.safetensors", dtype="fp32")
    back = lora.load(out)
    assert back.keys() == layers.keys()
    for name, (down, up, alpha) in layers.items():
        assert torch.equal(back[name][0], down) and torch.equal(back[name][1], up) and back[name][2] == alpha
    # fp16 by default, alpha included
    half, _ = checkpoint.read_state_dict(lora.save(layers, tmp_path / "h.safetensors"))
    assert {v.dtype for v in half.values()} == {torch.float16}


def test_merge_adds_up_down_times_alpha_over_rank(tiny_model):
    path, tokenizer = tiny_model
    model = checkpoint.load(path, tokenizer=tokenizer)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(3, 64), torch.randn(64, 3)
    lora.merge(model, {name: (down, up, 1.5)}, scale=2.0)
    key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(model.unet.state_dict()[key], before[key] + 2.0 * (up @ down) * 0.5)


def test_merging_a_lora_of_another_architecture_is_refused(tiny_model, sd1_networks, tmp_path):
    path, tokenizer = tiny_model
    model = checkpoint.load(path, tokenizer=tokenizer)
    unet, text_encoder = sd1_networks
    # SD 1.x's 12 text encoder layers: names the tiny model (2 layers) lacks
    name = "lora_te_text_model_encoder_layers_11_mlp_fc2"
    with pytest.raises(DreampipeError, match=f"x.safetensors.*{name}.*another architecture"):
        lora.merge(model, {name: (torch.zeros(2, 3072), torch.zeros(768, 2), 2.0)}, source="x.safetensors")
    # a name both have, with SD 1.x's shapes
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    with pytest.raises(DreampipeError, match=f"{name}.*another architecture"):
        lora.merge(model, {name: (torch.zeros(2, 320, 1, 1), torch.zeros(320, 2, 1, 1), 2.0)})


def test_diffusers_loads_our_file_to_the_model_our_merge_makes(tiny_model, tmp_path):
    """diffusers' kohya converter (load_lora_weights, through peft) reads the file; its pipeline
    then draws what the base model with lora.merge applied draws."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path, tokenizer = tiny_model

    def pipeline(model):
        return StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
            scheduler=DDIMScheduler.from_config(model.architecture["scheduler"]), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)

    def draw(pipe):
        return pipe("a photo of zxq robot", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base = checkpoint.load(path, tokenizer=tokenizer)
    layers = random_layers(base, rank=2, alpha=1.0, conv_rank=2)
    file = lora.save(layers, tmp_path / "zxq.lora.safetensors", dtype="fp32")
    before = draw(pipeline(base))

    pipe = pipeline(base)
    pipe.load_lora_weights(str(file))
    loaded = draw(pipe)
    adapted = {n for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A")} | \
              {n for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == len(layers), "diffusers left layers of the file out"

    merged = checkpoint.load(path, tokenizer=tokenizer)
    lora.merge(merged, lora.load(file))
    after = draw(pipeline(merged))
    assert abs(after - before).max() > 0.05, "the LoRA changes nothing: the test would be vacuous"
    assert abs(loaded - after).max() < 1e-4


def header_and_data(path):
    """The JSON header and the bytes after it, read by hand (the safetensors layout)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def check_hashes(path, meta):
    """modelspec.hash_sha256 is 0x + SHA-256 of the bytes after the header, which are also the
    tensors' raw bytes in the order of their offsets (sd-scripts' per-tensor recipe)."""
    import hashlib

    from safetensors import safe_open

    header, data = header_and_data(path)
    assert header["__metadata__"] == meta
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    by_offset = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    with safe_open(str(path), framework="pt") as f:
        tensors = b"".join(f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for _, k in by_offset)
    assert tensors == data
    assert modelspec.data_hash(path) == meta["modelspec.hash_sha256"][2:]


def test_an_exported_model_carries_modelspec_metadata_and_the_hash_of_its_data(tiny_model, tmp_path):
    import datetime

    from dreampipe import export

    path, tokenizer = tiny_model
    settings = {"subjects": [{"token": "zxq", "class_word": "robot", "instance_prompt": "a photo of zxq robot"}],
                "resolution": 64, "learning_rate": 1e-6}
    out = export.run(path, tmp_path / "alice.safetensors", "fp16", tokenizer, settings)
    _, meta = checkpoint.read_state_dict(out)
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.") and k not in (
        "modelspec.date", "modelspec.hash_sha256")} == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "alice", "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "a photo of zxq robot"}
    assert json.loads(meta["dreampipe.settings"]) == settings
    written = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - written).total_seconds()) < 120
    check_hashes(out, meta)
    # the same tensors give the same hash whatever the metadata; other tensors another
    again = export.run(path, tmp_path / "bob.safetensors", "fp16", tokenizer, {})
    assert checkpoint.read_state_dict(again)[1]["modelspec.hash_sha256"] == meta["modelspec.hash_sha256"]
    fp32 = export.run(path, tmp_path / "alice32.safetensors", "fp32", tokenizer, settings)
    assert checkpoint.read_state_dict(fp32)[1]["modelspec.hash_sha256"] != meta["modelspec.hash_sha256"]
    # a .ckpt keeps the keys but no hash (the hash is of a safetensors file's data)
    _, ckpt = checkpoint.read_state_dict(export.run(path, tmp_path / "alice.ckpt", "fp16", tokenizer, settings))
    assert ckpt["modelspec.title"] == "alice" and "modelspec.hash_sha256" not in ckpt


def test_a_lora_file_carries_modelspec_metadata_and_the_hash_automatic1111_reads(tiny_model, tmp_path):
    path, tokenizer = tiny_model
    layers = random_layers(checkpoint.load(path, tokenizer=tokenizer))
    out = lora.save(layers, tmp_path / "alice.lora.safetensors", metadata={"ss_network_dim": "2"})
    _, meta = checkpoint.read_state_dict(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "alice" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    check_hashes(out, meta)
    assert meta["sshs_model_hash"] == meta["modelspec.hash_sha256"][2:]


@pytest.fixture(scope="module")
def finetune(tiny_model, tmp_path_factory):
    """A "finetune" of the tiny model: every UNet layer LoRA targets (3x3 convs too) and half the
    text encoder's moved by a random full-rank change, biases and norms too; saved in fp32."""
    path, tokenizer = tiny_model
    model = checkpoint.load(path, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            p += 0.01 * torch.randn(p.shape, generator=g)
        for name, p in model.text_encoder.named_parameters():
            if "layers.1." in name:
                p += 0.01 * torch.randn(p.shape, generator=g)
    file = checkpoint.save(model, tmp_path_factory.mktemp("finetune") / "ft.safetensors", dtype="fp32")
    return file, tokenizer


def target_weights(model, conv=True):
    return {lora.kohya_name(part, name): getattr(model, part).get_submodule(name).weight.detach().clone()
            for part in lora.PREFIXES for name in lora.targets(getattr(model, part), part, conv)}


def residual(ft, base, layers):
    """||finetune - (base + LoRA)|| / ||finetune - base|| over the layers LoRA targets (LoCon)."""
    merged = target_weights(base)
    for name, (down, up, alpha) in layers.items():
        merged[name] = merged[name] + lora.delta(down, up, alpha).reshape(merged[name].shape)
    goal, start = target_weights(ft), target_weights(base)
    return (sum((goal[k] - merged[k]).square().sum() for k in goal).sqrt()
            / sum((goal[k] - start[k]).square().sum() for k in goal).sqrt()).item()


def test_a_full_rank_extraction_merged_into_the_base_is_the_finetune(tiny_model, finetune):
    path, tokenizer = tiny_model
    base, ft = checkpoint.load(path, tokenizer=tokenizer), checkpoint.load(finetune[0], tokenizer=tokenizer)
    lines = []
    layers = lora.extract(ft, base, rank=1000, conv_rank=1000, log=lines.append)
    changed_te = {n for n in layers if n.startswith("lora_te_")}
    assert changed_te and all("layers_1_" in n for n in changed_te), "unchanged text encoder layers are left out"
    assert len(layers) == len(target_weights(base)) - sum(1 for n in target_weights(base) if "te_text_model_encoder_layers_0_" in n)
    for name, (down, up, alpha) in layers.items():
        assert alpha == down.shape[0]  # scale 1: up @ down is the change itself
    lora.merge(base, layers)
    got, want = target_weights(base), target_weights(ft)
    for name in want:
        assert (got[name] - want[name]).norm() <= 1e-4 * want[name].norm(), name
    assert any("100.0%" in line for line in lines), lines


def test_a_lower_rank_keeps_less_and_says_how_much(tiny_model, finetune):
    path, tokenizer = tiny_model
    base, ft = checkpoint.load(path, tokenizer=tokenizer), checkpoint.load(finetune[0], tokenizer=tokenizer)
    errors, kept = [], []
    for rank in (1, 4, 16):
        lines = []
        layers = lora.extract(ft, base, rank=rank, conv_rank=rank, log=lines.append)
        assert {down.shape[0] for down, _, _ in layers.values()} == {rank}
        errors.append(residual(ft, base, layers))
        [share] = [float(w.rstrip("%")) for line in lines for w in line.split() if w.endswith("%")][:1]
        kept.append(share)
    assert errors[0] > errors[1] > errors[2] > 0.01
    assert kept[0] < kept[1] < kept[2] < 100
    # without conv_rank the 3x3 convs are left out: kohya's LoRA (no LoCon)
    layers = lora.extract(ft, base, rank=4)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in layers
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in layers


def test_extracting_from_models_of_two_architectures_is_refused(tiny_model):
    from transformers import CLIPTextConfig, CLIPTextModel

    path, tokenizer = tiny_model
    base, other = checkpoint.load(path, tokenizer=tokenizer), checkpoint.load(path, tokenizer=tokenizer)
    other.text_encoder = CLIPTextModel(CLIPTextConfig(**{**base.architecture["text_encoder"], "num_hidden_layers": 1}))
    with pytest.raises(DreampipeError, match="architecture"):
        lora.extract(other, base, rank=4)


def test_extract_lora_command_writes_the_file_and_logs_what_it_kept(tiny_model, finetune, tmp_path):
    """No --tokenizer: extraction needs none."""
    path, tokenizer = tiny_model
    out, log = tmp_path / "ft.lora.safetensors", tmp_path / "extract.log"
    r = subprocess.run([sys.executable, "-m", "dreampipe.cli", "extract-lora", str(finetune[0]), str(path), str(out),
                        "--rank", "4", "--conv-rank", "2", "--log", str(log),
                        "--settings", json.dumps({"resolution": 64})],
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "workflow")})
    assert r.returncode == 0, r.stderr
    layers = lora.load(out)
    assert layers["lora_unet_down_blocks_0_resnets_0_conv1"][0].shape[0] == 2
    assert layers["lora_unet_down_blocks_0_attentions_0_proj_in"][0].shape[0] == 4
    tensors, meta = checkpoint.read_state_dict(out)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.title"] == "ft"
    text = log.read_text()
    assert "Frobenius norm" in text and f"{len(layers)} layers" in text
    # the LoRA moves the base towards the finetune
    base, ft = checkpoint.load(path, tokenizer=tokenizer), checkpoint.load(finetune[0], tokenizer=tokenizer)
    assert residual(ft, base, layers) < 0.999


def test_export_lora_rank_makes_the_workflow_write_the_lora_and_a_new_rank_reruns_only_it(workflow):
    workflow.character("bob", token="sks", class_word="robot")
    assert "export_lora" not in {rule for rule, _ in workflow.planned()}
    workflow.character("bob", token="sks", class_word="robot", export={"lora_rank": 4, "lora_conv_rank": 2})
    assert ("export_lora", "bob") in workflow.planned()
    workflow.snakemake("-p", "results/bob/bob.lora.safetensors")  # an option ends --resources
    out = workflow.path / "results" / "bob"
    layers = lora.load(out / "bob.lora.safetensors")
    assert {down.shape[0] for down, _, _ in layers.values()} == {2, 4}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in layers
    assert not any(n.startswith("lora_te_") for n in layers), "the text encoder was not trained"
    _, meta = checkpoint.read_state_dict(out / "bob.lora.safetensors")
    assert meta["modelspec.trigger_phrase"] == "a photo of sks robot" and meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["dreampipe.settings"])["max_steps"] == 4
    assert "Frobenius norm" in (out / "logs" / "export-lora.log").read_text()
    # the rank is a param: a new one reruns the extraction, nothing upstream
    workflow.character("bob", token="sks", class_word="robot", export={"lora_rank": 2})
    planned = workflow.snakemake("-n", "results/bob/bob.lora.safetensors").stdout
    assert "export_lora" in planned and "rule train" not in planned, planned


def test_a_pruned_model_gets_modelspec_keys_and_a_fresh_hash_keeping_the_sources_own(tiny_model, tmp_path):
    from dreampipe import prune

    path, _ = tiny_model
    weights, meta = checkpoint.read_state_dict(path)
    fat = checkpoint.write_file(weights, tmp_path / "fat.safetensors", "fp32",
                                {**meta, "modelspec.title": "Fat model", "modelspec.hash_sha256": "0xstale"})
    out = prune.run(fat, tmp_path / "slim.safetensors")
    _, slim = checkpoint.read_state_dict(out)
    assert slim["modelspec.title"] == "Fat model" and slim["modelspec.architecture"] == "stable-diffusion-v1"
    check_hashes(out, slim)
