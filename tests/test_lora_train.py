"""train.method lora: adapters on frozen base weights, written merged into the model and as a
kohya-layout LoRA file (resumable to the bit like a full finetune: test_train.py's resume test)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
import test_train
from test_train import identical, run, settings

from dreampipe import checkpoint, config, lora, train
from dreampipe.errors import DreampipeError

UNET, TEXT = checkpoint.UNET_PREFIX, checkpoint.TEXT_PREFIX
instance, class_images, one_thread = test_train.instance, test_train.class_images, test_train.one_thread  # fixtures
# a learning rate that moves the tiny model's adapters well away from zero in a few steps
LORA = dict(method="lora", lora_rank=4, lora_learning_rate=1e-2, lora_text_encoder_learning_rate=1e-2)


@pytest.fixture
def modules(monkeypatch):
    """Every DreamBooth module the test builds."""
    made = []
    init = train.DreamBooth.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(train.DreamBooth, "__init__", spy)
    return made


def test_only_the_adapters_train_and_the_base_weights_stay_as_loaded(tiny_model, instance, tmp_path, modules):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=3, train_text_encoder=True, ema=True, **LORA)
    [module] = modules
    base = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    for part in ("unet", "text_encoder"):
        net, loaded = getattr(module, part), getattr(base, part).state_dict()
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), part
        frozen = {n.replace(".base_layer.", "."): p for n, p in net.named_parameters() if "lora_" not in n}
        assert frozen.keys() == loaded.keys()
        assert all(torch.equal(p, loaded[n]) for n, p in frozen.items()), f"{part}: a base weight moved"
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    adapters = {id(p) for n, p in module.named_parameters() if "lora_" in n}
    assert optimized == adapters, "the optimizer holds the adapters and nothing else"
    unet_adapters = [p for n, p in module.unet.named_parameters() if "lora_" in n]
    assert len(module.ema.shadow_params) == len(unet_adapters), "EMA averages the UNet's adapters only"


def test_adapters_start_from_the_seed_whatever_the_global_random_state(tiny_model):
    def lora_a(seed):
        model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
        torch.manual_seed(torch.seed())  # anything
        module = train.DreamBooth(model, settings(seed=seed, **LORA))
        return {n: p.detach().clone() for n, p in module.unet.named_parameters() if ".lora_A." in n}

    first = lora_a(0)
    assert first and identical(first, lora_a(0))
    assert not any(torch.equal(first[n], w) for n, w in lora_a(1).items())


def test_the_lora_file_merged_into_the_base_model_is_the_written_model(tiny_model, instance, tmp_path):
    written = run(tiny_model, [(instance, None)], tmp_path, max_steps=4, train_text_encoder=True, lora_conv_rank=2,
                  **LORA)
    out = lora.run(tmp_path / "model.safetensors", tiny_model[0], tmp_path / "alice.lora.safetensors",
                   log=lambda *a: None)  # no rank: the trained layers are written as trained
    with safe_open(out, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["modelspec.architecture"] == lora.ARCHITECTURE and meta["modelspec.title"] == "alice"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(LORA["lora_rank"]), "1.0")  # alpha: the default
    # kohya's names: what AUTOMATIC1111 and ComfyUI look for
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            "lora_unet_down_blocks_0_resnets_0_conv1.alpha"} <= keys
    layers = lora.load(out)
    assert all(down.dtype == torch.float16 for down, _, _ in layers.values())
    down, up, alpha = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert down.shape[:2] == (2, 32) and down.shape[2:] == (3, 3) and up.shape == (32, 2, 1, 1) and alpha == 1
    assert layers["lora_unet_down_blocks_0_attentions_0_proj_in"][0].shape == (4, 32, 1, 1)

    def merged(layers):
        base = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
        lora.merge(base, {k: (d.float(), u.float(), a) for k, (d, u, a) in layers.items()})
        return checkpoint.to_ldm(base)

    # the written model is the base with the trained adapters merged: exactly with the training
    # copy the trained file keeps, to fp16 rounding of the adapters with the exported file
    model = {k: v for k, v in written.items() if not k.startswith("lora_")}
    assert identical(merged(lora.load(tmp_path / "model.safetensors")), model)
    fp16 = merged(layers)
    base = load_file(tiny_model[0])
    moved = [k for k in model if k.startswith((UNET, TEXT)) and not torch.equal(model[k], base[k])]
    assert any(k.startswith(TEXT) for k in moved) and any(".in_layers.2." in k for k in moved), "all parts trained"
    for k in moved:  # fp16 adapters: 2^-11 of the change, and the fp32 sum's own rounding
        tolerance = 2e-3 * (model[k] - base[k]).abs().max() + 2 * torch.finfo(torch.float32).eps * base[k].abs().max()
        assert (fp16[k] - model[k]).abs().max() <= tolerance, k


def test_the_saved_state_holds_the_adapters_and_their_optimizer_state_only(tiny_model, instance, tmp_path):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=3, keep_state=True, train_text_encoder=True, **LORA)
    state = torch.load(tmp_path / ".state" / train.STATE_FILE, weights_only=True)
    assert state["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in state["state_dict"])
    assert any(k.startswith("text_encoder.") for k in state["state_dict"])
    shapes = sorted(tuple(v.shape) for v in state["state_dict"].values())
    moments = sorted(tuple(s["exp_avg"].shape) for s in state["optimizer_states"][0]["state"].values())
    assert moments == shapes
    size = (tmp_path / ".state" / train.STATE_FILE).stat().st_size
    assert size < 0.2 * (tmp_path / "model.safetensors").stat().st_size


def test_a_saved_full_finetune_state_is_refused_by_a_lora_run(tiny_model, instance, tmp_path, monkeypatch):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=3, keep_state=True)
    kept = (tmp_path / ".state" / "fingerprint").read_text()
    monkeypatch.setattr(train, "fingerprint", lambda *a, **k: kept)  # as though the settings had not changed
    with pytest.raises(DreampipeError, match="does not match the model.*missing.*lora_A"):
        run(tiny_model, [(instance, None)], tmp_path, max_steps=3, keep_state=True, **LORA)


def test_progressive_checkpoints_of_a_lora_run_are_lora_files(tiny_model, instance, tmp_path):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=5, save_every_n_steps=2, keep_last=0, **LORA)
    files = sorted((tmp_path / "train" / "checkpoints").iterdir())
    assert [f.name for f in files] == ["step-00002.lora.safetensors", "step-00004.lora.safetensors"]
    layers = lora.load(files[-1])
    assert layers and all(k.startswith("lora_unet_") for k in layers)
    assert all(d.dtype == torch.float16 for d, _, _ in layers.values())


def test_a_lora_rank_below_one_is_refused_at_load(workflow):
    workflow.character("alice", train={"method": "lora", "lora_rank": 0})
    with pytest.raises(DreampipeError, match="alice.yaml: train.lora_rank: 0 is less than the minimum of 1"):
        config.load({}, workflow.path)


def test_a_lora_character_exports_its_lora_file(workflow):
    workflow.character("alice", train={"method": "lora"})
    workflow.character("bob")
    planned = workflow.planned()
    assert ("export_lora", "alice") in planned and ("export_lora", "bob") not in planned


def test_the_other_methods_settings_are_not_trainings_and_rerun_nothing(workflow):
    workflow.character("alice", train={"lora_rank": 8})
    workflow.character("bob", train={"method": "lora", "learning_rate": 1e-6})
    _, chars = config.load({}, workflow.path)
    full, lora_run = (config.split_train_settings(chars[c])[0] for c in ("alice", "bob"))
    assert "learning_rate" in full and not any(k.startswith("lora_") for k in full)
    assert lora_run["lora_rank"] == 16 and "learning_rate" not in lora_run and "text_encoder_learning_rate" not in lora_run


def test_the_merged_model_draws_what_the_adapters_draw(tiny_model):
    """Adapters.merged is a model to run, not only to save: its text encoder has the position ids
    (CLIP's one buffer outside the state dict) of the network it was made from, none left on the meta
    device, so it embeds a caption as the adapted one does."""
    from dreampipe import lora_training

    model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    adapters = lora_training.Adapters(model, settings(train_text_encoder=True, **LORA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in adapters.parts:
            for n, p in getattr(model, part).named_parameters():
                if ".lora_B." in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        merged = adapters.merged(adapters.layers())
        assert not any(b.is_meta for net in (merged.unet, merged.text_encoder) for b in net.buffers())
        ids = model.tokenizer(["a photo of zxq star"], padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        context = model.text_encoder(ids)[0]
        assert torch.allclose(merged.text_encoder(ids)[0], context, atol=1e-5)
        x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
        assert torch.allclose(merged.unet(x, t, encoder_hidden_states=context).sample,
                              model.unet(x, t, encoder_hidden_states=context).sample, atol=1e-5)
