"""Train: resumable to the bit, every option doing what it says, any image counts, tiny and fast."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from dreampipe import checkpoint, config, prepare, sampling, speed, train
from dreampipe.errors import DreampipeError

ROOT = Path(__file__).resolve().parent.parent
UNET, TEXT, VAE = checkpoint.UNET_PREFIX, checkpoint.TEXT_PREFIX, checkpoint.VAE_PREFIX


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in this process and in the training subprocesses: float reductions then run in
    the same order in both, and the shared CPUs are not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def instance(example_photos, tmp_path_factory):
    """The example photos prepared at 64 px: 6 images, one with its own caption."""
    out = tmp_path_factory.mktemp("instance") / "instance"
    prepare.run(example_photos, out, 64, "pad", "white", "a photo of zxq robot")
    return out


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
    """Seven distinct class images; class_manifest(n) lists the first n."""
    folder = tmp_path_factory.mktemp("class")
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def class_manifest(folder: Path, n: int, prompt: str = "a photo of a robot") -> Path:
    path = folder / f"n{n}-{prompt.replace(' ', '-')}.json"
    path.write_text(json.dumps({"prompt": prompt, "images": [str(folder / f"{i:05d}.png") for i in range(n)]}))
    return path


def instance_subset(prepared: Path, n: int, dst: Path) -> Path:
    """A prepared folder holding the first n images of another."""
    manifest = json.loads((prepared / "manifest.json").read_text())[:n]
    dst.mkdir(parents=True)
    for m in manifest:
        shutil.copy(prepared / m["file"], dst / m["file"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def settings(**overrides) -> dict:
    return {**config.defaults()["train"], "resolution": 64, "max_steps": 4, "learning_rate": 1e-4,
            "sample_every_n_steps": 0, "sample_steps": 2, "sample_prompts": ["a photo of zxq robot"],
            "sample_seeds": [0], "save_state_every_n_steps": 2, **overrides}


def run(tiny_model, subjects, folder: Path, **overrides) -> dict:
    """Train in this process; the trained weights by LDM key."""
    model, tokenizer = tiny_model
    out = train.run(model, tokenizer, subjects, settings(**overrides), folder / ".state", folder / "train",
                    folder / "model.safetensors")
    return load_file(out)


def part(weights: dict, prefix: str) -> dict:
    return {k: v for k, v in weights.items() if k.startswith(prefix)}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- resume ------------------------------------------------------------------------------------

def train_command(tiny_model, subjects, folder: Path, s: dict) -> list[str]:
    model, tokenizer = tiny_model
    args = [sys.executable, "-m", "dreampipe.cli", "train", "--model", str(model), "--tokenizer", str(tokenizer),
            "--settings", json.dumps(s), "--state", str(folder / ".state"), "--workdir", str(folder / "train"),
            "--out", str(folder / "model.safetensors")]
    for instance_dir, manifest in subjects:
        args += ["--instance-dir", str(instance_dir)] + (["--class-manifest", str(manifest)] if manifest else [])
    return args


def start(cmd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=300, *, every=0.02, details=None):
    """Until condition() holds, while proc runs. details(): what a failure message adds (default:
    the tail of proc's stderr pipe)."""
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, ("training ended before the test could interrupt it:\n"
                                     + (details() if details else proc.communicate()[1][-3000:]))
        assert time.time() < end, "timed out" + (f"\n{details()}" if details else "")
        time.sleep(every)


# Everything that carries state across steps is on: class images, EMA, a text encoder that stops
# training midway, flips, offset noise, caption dropout, Min-SNR, accumulation, a warm-up schedule.
# The validation loss is measured too (every 3 steps), and with prior_prediction the base UNet's
# prediction replaces the class images.
RESUME_SETTINGS = dict(max_steps=8, save_state_every_n_steps=2, ema=True, train_text_encoder=True,
                       text_encoder_steps=5, random_flip=True, offset_noise=0.1, caption_dropout=0.3,
                       snr_gamma=5.0, gradient_accumulation_steps=2, lr_scheduler="linear", lr_warmup_steps=3,
                       validation_every_n_steps=3)


RESUME_VARIANTS = {"class images": {}, "prior_prediction": {"prior_prediction": ["a photo of a robot"]},
                   "lora": dict(method="lora", lora_rank=4, lora_conv_rank=2, lora_learning_rate=1e-2,
                                lora_text_encoder_learning_rate=1e-2)}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_killed_training_resumes_to_bit_identical_weights(tiny_model, instance, class_images, tmp_path, variant):
    pp = variant == "prior_prediction"
    subjects = [(instance, None if pp else class_manifest(class_images, 3))]
    resume_settings = {**RESUME_SETTINGS, **RESUME_VARIANTS[variant]}
    whole = run(tiny_model, subjects, tmp_path / "whole", **resume_settings)

    folder = tmp_path / "killed"
    cmd = train_command(tiny_model, subjects, folder, settings(**resume_settings))
    proc = start(cmd)
    wait_for(lambda: (folder / ".state" / train.STATE_FILE).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "model.safetensors").exists()

    resumed = start(cmd)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    assert identical(load_file(folder / "model.safetensors"), whole)
    steps = [int(r.split(",")[0]) for r in (folder / "train" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9)), "the loss log has every step once"
    assert val_losses(folder) == val_losses(tmp_path / "whole") and sorted(val_losses(folder)) == [3, 6, 8]
    assert losses(folder, 3) == losses(tmp_path / "whole", 3)
    assert not (folder / ".state").exists(), "state is removed once the model is written"


def test_sigterm_saves_state_and_exits_with_a_clear_message(tiny_model, instance, tmp_path):
    proc = start(train_command(tiny_model, [(instance, None)], tmp_path,
                               settings(max_steps=60, save_state_every_n_steps=0)))
    csv = tmp_path / "train" / "loss.csv"
    # the loss rows are written every 25 steps: the first ones mean training is well under way
    wait_for(lambda: csv.exists() and len(csv.read_text().splitlines()) > 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "training stopped by SIGTERM at step" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert (tmp_path / ".state" / train.STATE_FILE).exists()
    assert not (tmp_path / "model.safetensors").exists()


def test_changed_training_value_starts_fresh_and_unchanged_resumes(tiny_model, instance, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dreampipe.train")
    subjects = [(instance, None)]
    first = run(tiny_model, subjects, tmp_path, keep_state=True)  # keeps the state of step 2

    caplog.clear()
    assert identical(run(tiny_model, subjects, tmp_path, keep_state=True), first)
    assert "resuming from" in caplog.text

    caplog.clear()
    run(tiny_model, subjects, tmp_path, keep_state=True, sample_prompts=["a photo of a robot"])
    assert "resuming from" in caplog.text, "a sampling prompt does not shape the weights"

    caplog.clear()
    run(tiny_model, subjects, tmp_path, keep_state=True, learning_rate=2e-4)
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text


def test_a_saved_state_whose_keys_do_not_match_the_model_is_refused(tiny_model, instance, tmp_path):
    subjects = [(instance, None)]
    run(tiny_model, subjects, tmp_path, keep_state=True)
    state = tmp_path / ".state" / train.STATE_FILE
    ckpt = torch.load(state, weights_only=True)
    dropped = next(k for k in ckpt["state_dict"] if k.startswith("unet."))
    ckpt["state_dict"]["unet.extra.weight"] = ckpt["state_dict"].pop(dropped)
    torch.save(ckpt, state)
    with pytest.raises(DreampipeError, match=f"does not match.*missing.*{dropped}.*unexpected.*unet.extra.weight"):
        run(tiny_model, subjects, tmp_path, keep_state=True)


def test_fingerprint_hashes_each_input_once_by_content(tmp_path):
    """The base model (GBs) is hashed as a stream and the hash is kept by (path, size, mtime):
    a resume does not read it again; a changed file (new mtime) gets a new fingerprint."""
    model, cache, s = tmp_path / "model.safetensors", tmp_path / ".cache" / "hashes.json", settings()
    model.write_bytes(b"a" * 1000)
    first = train.fingerprint(s, [model], 1, cache=cache)
    st = model.stat()
    model.write_bytes(b"b" * 1000)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert train.fingerprint(s, [model], 1, cache=cache) == first  # not read again
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert train.fingerprint(s, [model], 1, cache=cache) != first
    assert train.fingerprint({**s, "learning_rate": 1.0}, [model], 1, cache=cache) != first


# ---- options -----------------------------------------------------------------------------------

def distance(a: dict, b: dict, prefix: str = UNET) -> float:
    return float(sum((a[k] - b[k]).float().norm() ** 2 for k in a if k.startswith(prefix))) ** 0.5


def losses(folder: Path, column: int = 2) -> list[float]:
    return [float(r.split(",")[column]) for r in (folder / "train" / "loss.csv").read_text().splitlines()[1:]]


def test_prior_loss_weight_zero_equals_no_class_data(tiny_model, instance, class_images, tmp_path):
    with_class = [(instance, class_manifest(class_images, 3))]
    zero = run(tiny_model, with_class, tmp_path / "zero", prior_loss_weight=0.0)
    none = run(tiny_model, [(instance, None)], tmp_path / "none")
    one = run(tiny_model, with_class, tmp_path / "one", prior_loss_weight=1.0)
    base = load_file(tiny_model[0])
    # the instance items draw the same latents, noise and timesteps with or without class items
    assert losses(tmp_path / "zero")[0] == pytest.approx(losses(tmp_path / "none")[0], abs=1e-6)
    # Tolerance: the class items only change the batch the UNet computes in, which moves float
    # sums in the last bits; Adam turns that noise into full-size steps for the few weights whose
    # gradient is ~0 (biases feeding a GroupNorm), so the weights agree to 25% of the distance
    # they travelled, where a prior loss that counts moves them by about that whole distance.
    travelled = distance(none, base)
    assert distance(zero, none) < 0.25 * travelled
    assert distance(one, none) > 0.5 * travelled


def test_text_encoder_changes_only_when_trained_and_until_its_stop_step(tiny_model, instance, tmp_path):
    subjects, base = [(instance, None)], load_file(tiny_model[0])
    frozen = run(tiny_model, subjects, tmp_path / "frozen")
    trained = run(tiny_model, subjects, tmp_path / "trained", train_text_encoder=True)
    stopped = run(tiny_model, subjects, tmp_path / "stopped", train_text_encoder=True, text_encoder_steps=2)
    two_steps = run(tiny_model, subjects, tmp_path / "two", train_text_encoder=True, max_steps=2)
    assert identical(part(frozen, TEXT), part(base, TEXT))
    assert not identical(part(trained, TEXT), part(base, TEXT))
    assert identical(part(stopped, TEXT), part(two_steps, TEXT))
    assert not identical(part(stopped, TEXT), part(trained, TEXT))
    assert all(identical(part(w, VAE), part(base, VAE)) for w in (frozen, trained, stopped))


def test_text_encoder_learning_rate_zero_keeps_the_text_encoder(tiny_model, instance, tmp_path):
    base = load_file(tiny_model[0])
    weights = run(tiny_model, [(instance, None)], tmp_path, train_text_encoder=True, text_encoder_learning_rate=0)
    assert identical(part(weights, TEXT), part(base, TEXT))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.97, 0.99, 1.0])
def test_ema_is_the_mean_of_the_first_steps_then_an_exponential_average_with_the_decay(
        decay, device="cpu", weights=torch.float64):
    """EMA weights after n steps, of the weights w_1..w_n the steps made: up to m = 1/(1 - decay)
    steps their plain mean, after it the exponential average with the decay (weight decay^k for
    the weights of k steps ago) continuing from that mean; decay 1 is the plain mean of all.
    On a GPU (tests/test_gpu.py) the weights are bf16 and the average is still fp32."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64 if weights == torch.float64 else torch.float32,
                                       device=device))
    ema = train.ema_model([p], decay)  # before the weights are cast, as in DreamBooth
    p.data = p.data.to(weights)
    trained = (torch.linspace(1, 3, 60, dtype=torch.float64) ** 2).to(weights).double()
    for w in trained:
        p.data.fill_(w)
        ema.step([p])
    n, m = len(trained), min(len(trained), round(1 / (1 - decay)) if decay < 1 else len(trained))
    expected = decay ** (n - m) * trained[:m].mean() + sum((1 - decay) * decay ** (n - k) * trained[k - 1]
                                                          for k in range(m + 1, n + 1))
    tolerance = 1e-9 if weights == torch.float64 else 1e-6  # fp32 average; bf16 would be off by ~1e-3
    assert torch.allclose(ema.shadow_params[0].double().cpu(), expected.reshape(1), rtol=tolerance)


def test_ema_gives_the_model_averaged_weights(tiny_model, instance, tmp_path):
    subjects, base = [(instance, None)], load_file(tiny_model[0])
    raw = run(tiny_model, subjects, tmp_path / "raw", max_steps=6)
    ema = run(tiny_model, subjects, tmp_path / "ema", max_steps=6, ema=True, ema_decay=0.9)
    assert not identical(part(ema, UNET), part(raw, UNET))
    assert identical(part(ema, TEXT), part(raw, TEXT))
    # an average over the path from the base weights lies behind the last point of the path
    moved = {k: (raw[k] - base[k]).norm() for k in part(raw, UNET)}
    assert sum((ema[k] - base[k]).norm() for k in moved) < sum(moved.values())


def test_progressive_checkpoints_are_fp16_inference_files_and_only_the_last_are_kept(tiny_model, instance, tmp_path):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=7, save_every_n_steps=2, keep_last=2)
    files = sorted((tmp_path / "train" / "checkpoints").iterdir())
    assert [f.name for f in files] == ["step-00004.safetensors", "step-00006.safetensors"]
    weights = load_file(files[-1])
    assert all(v.dtype == torch.float16 for k, v in weights.items() if v.is_floating_point())
    from dreampipe import modelspec

    _, meta = checkpoint.read_state_dict(files[-1])
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.title"] == f"{tmp_path.name}-step-00006" and meta["dreampipe.steps"] == "6"
    assert meta["modelspec.hash_sha256"] == "0x" + modelspec.data_hash(files[-1])
    model = checkpoint.load(files[-1], tokenizer=tiny_model[1])
    [image] = sampling.generate(model, ["a photo of zxq robot"], [0], resolution=64, steps=2)
    assert image.size == (64, 64)


def test_scale_lr_multiplies_by_the_global_batch_and_the_image_count():
    s = settings(batch_size=2, gradient_accumulation_steps=3)
    assert train.lr_factor({**s, "scale_lr": "none"}, world_size=2, instance_images=5) == 1
    assert train.lr_factor({**s, "scale_lr": "batch"}, world_size=2, instance_images=5) == 12
    assert train.lr_factor({**s, "scale_lr": "batch_and_images"}, world_size=2, instance_images=5) == 60


def test_adamw8bit_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    with pytest.raises(DreampipeError, match="pip install bitsandbytes.*or set train.optimizer: adamw"):
        train.make_optimizer(params, settings(optimizer="adamw8bit"), torch.device("cpu"))


# ---- data order --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_instance, n_class", [(5, 3), (1, 7), (3, 0)])
def test_odd_prime_and_mismatched_counts_train_exactly_max_steps(tiny_model, instance, class_images, tmp_path,
                                                                n_instance, n_class):
    subset = instance_subset(instance, n_instance, tmp_path / "instance")
    manifest = class_manifest(class_images, n_class) if n_class else None
    run(tiny_model, [(subset, manifest)], tmp_path, max_steps=7, batch_size=2, gradient_accumulation_steps=2)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "train" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 8))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dreampipe.steps"] == "7"


def test_each_image_is_used_equally_often_whatever_the_counts():
    data = train.StepIndices(settings(batch_size=3), [5], [7], start=0, total=35)
    batches = list(data)
    instance = [i for b in batches for i in b["instance"]]
    classes = [c for b in batches for c in b["class"]]
    assert sorted(instance) == sorted(list(range(5)) * 21)
    assert sorted(classes) == sorted(list(range(7)) * 15)
    assert instance[:5] != instance[5:10], "each pass is shuffled anew"


def test_a_batch_holds_no_tensors_for_ddp_to_move_to_the_gpu():
    """torch's DDP moves every tensor of a forward's inputs to its GPU (the DataModule's
    transfer_batch_to_device does not stop it), and the step then pinned CUDA tensors: the first
    two-GPU run on an H200 failed so. Plain ints stay where the step uses them, on the CPU."""
    batch = next(iter(train.StepIndices(settings(batch_size=2), [3], [4], start=0, total=1, rank=1, world_size=2)))
    assert batch == {"step": 0, "position": [2, 3], "instance": batch["instance"], "class": batch["class"]}
    assert all(type(i) is int for i in batch["instance"] + batch["class"])


def test_subjects_take_turns_with_their_own_images():
    data = train.StepIndices(settings(batch_size=2), [3, 2], [4, 5], start=0, total=6)
    items = [(i, c) for b in data for i, c in zip(b["instance"], b["class"])]
    assert all(i < 3 and c < 4 for i, c in items[0::2]), "even positions: subject 0"
    assert all(3 <= i < 5 and 4 <= c < 9 for i, c in items[1::2]), "odd positions: subject 1"


def test_ranks_split_the_global_batch_of_a_single_process():
    one = list(train.StepIndices(settings(batch_size=4), [6], [7], start=0, total=5))
    ranks = [list(train.StepIndices(settings(batch_size=2), [6], [7], start=0, total=5, rank=r, world_size=2))
             for r in range(2)]
    for k, batch in enumerate(one):
        for key in ("position", "instance", "class"):
            assert ranks[0][k][key] + ranks[1][k][key] == batch[key]


def test_resumed_data_order_continues_where_it_stopped():
    whole = list(train.StepIndices(settings(batch_size=2), [5], [3], start=0, total=9))
    tail = list(train.StepIndices(settings(batch_size=2), [5], [3], start=4, total=9))
    for a, b in zip(whole[4:], tail, strict=True):
        assert a == b


# ---- learning ----------------------------------------------------------------------------------

def fixed_batch_loss(model_path, tokenizer, prepared: Path) -> float:
    """Noise-prediction loss on every instance image at fixed noise and timesteps."""
    model = checkpoint.load(model_path, tokenizer=tokenizer)
    manifest = json.loads((prepared / "manifest.json").read_text())
    pixels = sampling.from_pil([Image.open(prepared / m["file"]) for m in manifest])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.linspace(100, 900, len(latents)).long()
        from diffusers import DDPMScheduler

        noisy = DDPMScheduler.from_config(model.architecture["scheduler"]).add_noise(latents, noise, timesteps)
        context = sampling.encode_prompts(model, [m["caption"] for m in manifest])
        return float(torch.nn.functional.mse_loss(model.unet(noisy, timesteps, context).sample, noise))


def test_loss_on_a_fixed_batch_decreases(tiny_model, instance, tmp_path):
    run(tiny_model, [(instance, None)], tmp_path, max_steps=10, learning_rate=1e-3)
    before = fixed_batch_loss(tiny_model[0], tiny_model[1], instance)
    after = fixed_batch_loss(tmp_path / "model.safetensors", tiny_model[1], instance)
    assert after < 0.8 * before


def test_two_subjects_train_into_one_model(tiny_model, instance, class_images, tmp_path):
    second = instance_subset(instance, 3, tmp_path / "second")
    for m in (manifest := json.loads((second / "manifest.json").read_text())):
        m["caption"] = "a photo of sks dog"
    (second / "manifest.json").write_text(json.dumps(manifest))
    subjects = [(instance, class_manifest(class_images, 3)), (second, class_manifest(class_images, 2, "a photo of a dog"))]
    # A token's embedding row gets a gradient only from batches whose captions hold it; without
    # weight decay an untouched row stays as it was. Both identifiers learn: both subjects trained.
    trained = run(tiny_model, subjects, tmp_path, max_steps=3, train_text_encoder=True, adam_weight_decay=0.0)
    key = f"{TEXT}text_model.embeddings.token_embedding.weight"
    before, after = load_file(tiny_model[0])[key], trained[key]
    ids = CLIPTokenizer.from_pretrained(str(tiny_model[1])).convert_tokens_to_ids
    assert not torch.equal(after[ids("zxq</w>")], before[ids("zxq</w>")]), "the first subject did not train"
    assert not torch.equal(after[ids("sks</w>")], before[ids("sks</w>")]), "the second subject did not train"
    assert torch.equal(after[ids("cat</w>")], before[ids("cat</w>")]), "a word of no caption changed"


def test_a_character_with_subjects_prepares_each_and_makes_a_class_set_per_class(workflow):
    (workflow.path / "config" / "characters" / "duo.yaml").write_text(yaml.safe_dump({"subjects": [
        {"instance_dir": "example/photos", "token": "zxq", "class_word": "robot"},
        {"instance_dir": "example/photos", "token": "sks", "class_word": "dog"}]}))
    _, chars = config.load({}, workflow.path)
    duo = chars["duo"]
    assert [s["instance_prompt"] for s in duo["subjects"]] == ["a photo of zxq robot", "a photo of sks dog"]
    assert [s["class_prompt"] for s in duo["subjects"]] == ["a photo of a robot", "a photo of a dog"]
    assert "a photo of zxq robot" in duo["sample"]["prompts"] and "a photo of sks dog" in duo["sample"]["prompts"]
    planned = workflow.planned()
    assert planned.count(("prepare", "duo")) == 2
    assert planned.count(("class_images", "")) == 2


def test_a_character_with_subjects_and_a_top_level_token_is_refused(workflow):
    workflow.character("duo", subjects=[{"instance_dir": "example/photos", "token": "sks", "class_word": "dog"}])
    with pytest.raises(DreampipeError, match=r"duo.yaml: instance_dir, token, class_word given beside subjects"):
        config.load({}, workflow.path)


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch_and_resumes(
        tiny_model, instance, tmp_path):
    """Two gloo processes of batch 1 after a SIGKILL and a resume land close to one process of
    batch 2: within 30% of the distance training moved the weights (measured: 0.16-0.22), while
    one process of batch 1, the wrong global batch, lands about as far away as training moved; and
    exactly where one process of batch 1 accumulating 2 micro-batches lands (the same arithmetic:
    the yardstick of the GPU twins in tests/test_gpu_slots.py). Both ranks' lines are in the --log
    file."""
    subjects = [(instance, None)]
    base = load_file(tiny_model[0])
    single = run(tiny_model, subjects, tmp_path / "single", max_steps=3, batch_size=2)
    wrong_batch = run(tiny_model, subjects, tmp_path / "wrong", max_steps=3, batch_size=1)
    accumulated = run(tiny_model, subjects, tmp_path / "accumulated", max_steps=3, batch_size=1,
                      gradient_accumulation_steps=2)

    folder = tmp_path / "ddp"
    cmd = train_command(tiny_model, subjects, folder,
                        settings(max_steps=3, batch_size=1, devices=2, save_state_every_n_steps=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # DDP starts a second process: kill the group
    wait_for(lambda: (folder / ".state" / train.STATE_FILE).exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (folder / "model.safetensors").exists()

    resumed = subprocess.run(cmd + ["--log", str(folder / "train.log")], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    # every rank logs to the one --log file, rank 1 after its prefix, and none cuts the other's lines
    logged = (folder / "train.log").read_text()
    assert "resuming from" in logged
    done = [line for line in logged.splitlines() if ": train done in" in line]
    assert len(done) == 2 and sum(" rank 1 " in line for line in done) == 1, logged
    ddp = load_file(folder / "model.safetensors")
    moved = distance(single, base)
    assert distance(ddp, single) < 0.3 * moved
    assert distance(wrong_batch, single) > 0.5 * moved
    assert identical(ddp, accumulated), "DDP of two ranks is one process accumulating their two micro-batches"


# ---- the GPU path's order of work, checked on the CPU ---------------------------------------------

def test_final_grid_and_model_are_written_before_lightning_moves_the_networks_off_the_device(
        tiny_model, instance, tmp_path, monkeypatch):
    """Lightning's teardown moves the module to the CPU when fit returns: on a GPU, anything done
    after that runs on the CPU (minutes at SD size). The last grid and the model come first."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    events = []
    teardown, save, generate = SingleDeviceStrategy.teardown, checkpoint.save, sampling.generate
    monkeypatch.setattr(SingleDeviceStrategy, "teardown", lambda self: (events.append("teardown"), teardown(self))[1])
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (events.append("save"), save(*a, **k))[1])
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: (events.append("grid"), generate(*a, **k))[1])
    run(tiny_model, [(instance, None)], tmp_path, max_steps=2)
    assert sorted(events[:2]) == ["grid", "save"] and events[2:] == ["teardown"], "the model is written beside the grid"


SHEET = dict(prompts=["a photo of zxq robot", "a photo of a robot"], seeds=[0, 1], steps=2, guidance_scale=5.0,
             sampler="dpmsolver++")


def rows_kept_vs_drawn(tiny_model, instance, folder: Path, monkeypatch, **overrides) -> float:
    """Train with the sample job's request; that job's grid from the rows the train job kept (no
    model loaded) against the grid it draws itself: mean absolute difference, of 255."""
    from dreampipe import sample

    run(tiny_model, [(instance, None)], folder, max_steps=3, sample_sheet=SHEET, **overrides)
    model, args = folder / "model.safetensors", dict(SHEET)
    draw = lambda out: sample.run(model, out, args["prompts"], args["seeds"], 64, steps=2, guidance_scale=5.0,
                                  sampler="dpmsolver++", tokenizer=tiny_model[1], base_model=tiny_model[0])
    with monkeypatch.context() as m:
        m.setattr(sampling, "load", lambda *a, **k: pytest.fail("the sample job loaded a model"))
        kept = np.asarray(Image.open(draw(folder / "kept.png"))).astype(float)
    shutil.rmtree(sample.rows_dir(model))
    drawn = np.asarray(Image.open(draw(folder / "drawn.png"))).astype(float)
    assert kept.shape == drawn.shape
    return float(np.abs(kept - drawn).mean())


@pytest.mark.parametrize("ema", [False, True])
def test_the_train_job_draws_the_sample_jobs_rows_as_the_sample_job_would(tiny_model, instance, tmp_path,
                                                                          monkeypatch, ema):
    """The sample job's before/after rows come from the train job, which holds the networks on the
    device: before from the base weights ahead of step 1, after from the weights it writes (EMA's
    when on). The sample job then stacks them with no model loaded, and they are the rows it draws."""
    assert rows_kept_vs_drawn(tiny_model, instance, tmp_path, monkeypatch, ema=ema, ema_decay=0.5) < 0.5


@pytest.mark.parametrize("failure", ["disk full", "out of GPU memory"])
def test_rows_the_train_job_cannot_draw_or_keep_are_left_to_the_sample_job(tiny_model, instance, tmp_path,
                                                                           monkeypatch, caplog, failure):
    """The rows are a saving, not a result: a failure to draw or keep them never costs the model."""
    from dreampipe import sample

    sheet = sample.sheet

    def fail(*a, **k):
        if failure == "out of GPU memory" and a[2] not in ("before", "after"):
            return sheet(*a, **k)  # the training grids draw as usual
        raise OSError(28, "No space left on device") if failure == "disk full" else torch.cuda.OutOfMemoryError()

    monkeypatch.setattr(sample, "keep" if failure == "disk full" else "sheet", fail)
    with caplog.at_level(logging.WARNING, logger="dreampipe.train"):
        run(tiny_model, [(instance, None)], tmp_path, max_steps=2, sample_sheet=SHEET)
    assert (tmp_path / "model.safetensors").exists()
    assert not (sample.rows_dir(tmp_path / "model.safetensors") / "after.json").exists()
    assert "the sample job draws it" in caplog.text


@pytest.mark.gpu
def test_on_a_gpu_the_train_jobs_rows_are_the_sample_jobs_to_bf16_accuracy(tiny_model, instance, tmp_path,
                                                                          monkeypatch):
    """On a GPU the train job draws with its bf16 UNet and the frozen networks as loaded; the sample
    job with all three in bf16: the same pictures to a few levels of 255."""
    difference = rows_kept_vs_drawn(tiny_model, instance, tmp_path, monkeypatch, ema=True, ema_decay=0.5)
    print(f"\nGPU train_rows_vs_sample_rows [{torch.cuda.get_device_name()}, torch {torch.__version__}]: "
          f"mean abs difference {difference:.2f} of 255", flush=True)
    assert difference < 4


def test_the_networks_take_their_training_dtype_before_the_strategy_wraps_them(tiny_model, instance, tmp_path,
                                                                               monkeypatch):
    """DDP hooks each weight's gradient as the weight is when DDP wraps the module (in the
    strategy's setup). A weight cast after that (to bf16 on a GPU) gets a new gradient
    accumulator that DDP never sees: with no error or warning (torch 2.x), no gradient is averaged
    and each GPU trains on its own half of the batch. So the networks are cast and laid out for
    training first (tests/test_gpu_slots.py checks DDP's result on two GPUs)."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    events = []
    prepare, setup = speed.prepare_training, SingleDeviceStrategy.setup
    monkeypatch.setattr(speed, "prepare_training", lambda *a, **k: (events.append("cast"), prepare(*a, **k))[1])
    monkeypatch.setattr(SingleDeviceStrategy, "setup",
                        lambda self, trainer: (events.append("wrap"), setup(self, trainer))[1])
    run(tiny_model, [(instance, None)], tmp_path, max_steps=1)
    assert events == ["cast", "wrap"]


def test_ema_model_is_written_from_the_fp32_average_not_through_the_training_dtype(tiny_model, instance, tmp_path,
                                                                                 monkeypatch):
    """The UNet written with EMA on is the EMA's own fp32 copy: a bf16 UNet must not round it."""
    written = {}
    save = checkpoint.save

    def spy(model, path, *a, unet_weights=None, **k):
        written.update(unet_weights or {})
        model.unet.to(torch.bfloat16)  # as on a GPU: the trained UNet holds bf16 weights
        return save(model, path, *a, unet_weights=unet_weights, **k)

    monkeypatch.setattr(checkpoint, "save", spy)
    weights = run(tiny_model, [(instance, None)], tmp_path, max_steps=3, ema=True, learning_rate=1e-2)
    assert written and all(v.dtype == torch.float32 for v in written.values())
    key = "conv_in.weight"
    ldm = UNET + "input_blocks.0.0.weight"
    assert torch.equal(weights[ldm], written[key].cpu())
    assert not torch.equal(weights[ldm], written[key].to(torch.bfloat16).float().cpu())


def test_state_is_written_in_the_background_while_training_goes_on(tiny_model, instance, tmp_path, monkeypatch):
    """A state save hands a snapshot to a writer thread; the saved state is the step's, however far
    training got while it was written."""
    writes, release = [], __import__("threading").Event()
    write = train.SaveState._write

    def slow(self, state, step):
        release.wait(60)  # training must not wait for this
        writes.append(state["global_step"])
        write(self, state, step)

    monkeypatch.setattr(train.SaveState, "_write", slow)
    progress = train.Progress.on_train_batch_end

    def on_step(self, trainer, *a):
        progress(self, trainer, *a)
        if trainer.global_step == 4:
            release.set()  # training reached step 4 while step 2's state was being written

    monkeypatch.setattr(train.Progress, "on_train_batch_end", on_step)
    run(tiny_model, [(instance, None)], tmp_path, max_steps=6, save_state_every_n_steps=2, keep_state=True)
    assert writes == [2, 4]
    saved = torch.load(tmp_path / ".state" / train.STATE_FILE, weights_only=True)
    assert saved["global_step"] == 4


def test_state_is_saved_by_elapsed_minutes(tiny_model, instance, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 40))  # every reading of the clock is 40 s later
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
    saved = []
    monkeypatch.setattr(train.SaveState, "_write", lambda self, state, step: saved.append(step))
    run(tiny_model, [(instance, None)], tmp_path, max_steps=5, save_state_every_n_steps=0,
        save_state_every_n_minutes=1)
    assert saved == [2, 4]  # a minute has passed at every other step end


def test_ema_curve_shows_the_running_mean_then_the_last_steps_and_reaches_the_loss_plot(tiny_model, instance,
                                                                                     tmp_path):
    ema = train.ema_model([torch.nn.Parameter(torch.zeros(1))], 0.99)
    short, long = train.ema_weights(ema.get_decay, 50), train.ema_weights(ema.get_decay, 1000)
    assert sum(short) == pytest.approx(1) and sum(long) == pytest.approx(1)
    assert max(short) == pytest.approx(min(short)), "before 1/(1 - decay) steps: the plain mean of all steps"
    assert sum(long[-100:]) == pytest.approx(1 - 0.99 ** 100, abs=0.01), "then about the last 100 steps"
    run(tiny_model, [(instance, None)], tmp_path, max_steps=3, ema=True)
    with_ema = Image.open(tmp_path / "train" / "loss.png").size
    run(tiny_model, [(instance, None)], tmp_path / "plain", max_steps=3)
    assert with_ema[0] > Image.open(tmp_path / "plain" / "train" / "loss.png").size[0], "a second panel for the EMA"


def test_ddp_with_bf16_weights_leaves_the_averaging_to_the_optimizer(monkeypatch):
    """DDP's reducer hooks each of the UNet's 686 weights and all-reduces them in 25 MB buckets
    after the replayed backward: on two H200s 15.5 it/s against 22.3 on one GPU, 1.39x the images
    a second (call 12, docs/benchmarks.md; goal 1.8). With bf16 weights AdamWBF16 averages its flat
    gradient buffers itself (tests/test_speed.py), so the strategy is DDP without torch's wrapper;
    an optimizer of fp32 weights keeps torch's DDP, the text encoder stopping early its search
    for unused weights (tests/test_speed.py trains two ranks through FlatGradientDDP)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    s = settings()
    assert isinstance(train.strategy(s, world=2, one_gpu=False), train.FlatGradientDDP)
    assert train.strategy({**s, "optimizer": "adamw8bit"}, world=2, one_gpu=False) == "ddp"
    stops = {**s, "optimizer": "adamw8bit", "train_text_encoder": True, "text_encoder_steps": 10}
    assert train.strategy(stops, world=2, one_gpu=False) == "ddp_find_unused_parameters_true"
    assert isinstance(train.strategy(s, world=1, one_gpu=True), train.StayOnDevice)


def test_low_memory_parks_the_frozen_networks_on_the_cpu_between_sample_grids(tiny_model, instance, tmp_path,
                                                                              monkeypatch):
    """train.low_memory at SD size peaked at 7.64 GiB while the VAE encoded 16 pictures at once
    and at 6.25 GiB during the steps (goal 6, docs/benchmarks.md): it encodes one picture at a
    time, and after the latents and captions are cached the frozen VAE and
    text encoder (0.4 GiB) wait on the CPU, back on the device only for the sample grids and the
    model written at the end, where they decode one picture at a time. Nothing else changes:
    the run ends where the default one does."""
    from diffusers import AutoencoderKL

    moves, batches, decoded = [], [], []
    to, encode, decode = torch.nn.Module.to, AutoencoderKL.encode, AutoencoderKL.decode

    def spy_to(self, *args, **kwargs):
        if isinstance(self, AutoencoderKL):
            moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return to(self, *args, **kwargs)

    def spy_encode(self, x, *args, **kwargs):
        batches.append(len(x))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    monkeypatch.setattr(AutoencoderKL, "encode", spy_encode)
    monkeypatch.setattr(AutoencoderKL, "decode",
                        lambda self, z, *a, **k: (decoded.append(len(z)), decode(self, z, *a, **k))[1])
    low = run(tiny_model, [(instance, None)], tmp_path / "low", max_steps=2, low_memory=True, sample_every_n_steps=1,
              sample_seeds=[0, 1])
    assert set(batches) == {1}  # one picture at a time (no mirror images without random_flip)
    assert decoded and set(decoded) == {1}, "the grids' pictures decoded one at a time"
    # to the device to cache, parked once the strategy has moved the whole module, then out and
    # back for each of 3 grids (steps 1, 2, final)
    assert moves.count("cpu") == 2 + 2 * 3, moves
    monkeypatch.setattr(torch.nn.Module, "to", to)
    default = run(tiny_model, [(instance, None)], tmp_path / "default", max_steps=2, sample_every_n_steps=1,
                  sample_seeds=[0, 1])
    assert identical(part(low, "first_stage_model."), part(default, "first_stage_model."))


def test_latents_and_captions_are_cached_before_the_unet_moves_and_the_optimizer_state_exists(
        tiny_model, instance, tmp_path, monkeypatch):
    """At SD size the VAE's activations while encoding came on top of the weights and AdamW's
    moments: low_memory peaked at 6.1 GiB there, 5.0 during the steps (H200, docs/benchmarks.md).
    Cached in setup, before configure_model (where Lightning makes new tensors on the device) and
    before the strategy moves the module and the optimizer allocates its state."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    events = []
    encode, embed, configure = AutoencoderKL.encode, CLIPTextModel.forward, train.DreamBooth.configure_optimizers
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: (events.append("encode"), encode(self, *a, **k))[1])
    monkeypatch.setattr(CLIPTextModel, "forward", lambda self, *a, **k: (events.append("embed"), embed(self, *a, **k))[1])
    monkeypatch.setattr(train.DreamBooth, "configure_optimizers",
                        lambda self: (events.append("optimizer"), configure(self))[1])
    run(tiny_model, [(instance, None)], tmp_path / "run", max_steps=1, sample_every_n_steps=0)
    first = events.index("optimizer")
    assert "encode" in events[:first] and "embed" in events[:first] and "encode" not in events[first:], events


@pytest.mark.parametrize("random_flip", [False, True])
def test_mirror_images_are_encoded_only_for_random_flips(tiny_model, instance, tmp_path, monkeypatch, random_flip):
    """The latents of the mirror images are cached only when train.random_flip can draw them
    (at SD size the VAE encodes 220 pictures at 512 px before the first step; the default is off)."""
    from diffusers import AutoencoderKL

    encoded, encode = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (encoded.append(len(x)), encode(self, x, *a, **k))[1])
    run(tiny_model, [(instance, None)], tmp_path, max_steps=1, random_flip=random_flip)
    pictures = len(json.loads((instance / "manifest.json").read_text()))
    assert sum(encoded) == pictures * (2 if random_flip else 1)


# ---- masked loss, Min-SNR weighting, caption dropout --------------------------------------------

def recording_unet(monkeypatch) -> list[dict]:
    """Every UNet call of training: its text context and its output, whose gradient it keeps."""
    calls, prepare_training = [], speed.prepare_training

    def recording(model, s, device):
        call = prepare_training(model, s, device)

        def unet(noisy, timesteps, context):
            out = call(noisy, timesteps, context)
            out.retain_grad()
            calls.append({"context": context.detach(), "pred": out, "timesteps": timesteps, "model": model})
            return out
        return unet

    monkeypatch.setattr(speed, "prepare_training", recording)
    return calls


def masked(prepared: Path, dst: Path, n: int = 3) -> Path:
    """The first n prepared images, each with a mask that keeps its left half."""
    out = instance_subset(prepared, n, dst)
    manifest = json.loads((out / "manifest.json").read_text())
    for i, m in enumerate(manifest):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        mask.save(out / f"{i:04d}.mask.png")
        m["mask"] = f"{i:04d}.mask.png"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def flipped(position: int, kind: str = "instance", seed: int = 0) -> bool:
    return bool(torch.rand((), generator=train.rng(seed, "item", kind, position)) < 0.5)


@pytest.mark.parametrize("mask_min", [0.0, 0.25])
def test_masked_loss_has_no_gradient_on_the_background_of_instance_images_only(tiny_model, instance, class_images,
                                                                              tmp_path, monkeypatch, mask_min):
    """The left half of each picture is the subject: 4 of the 8 latent columns; random flips flip
    the mask with the picture. The class images are never masked."""
    calls = recording_unet(monkeypatch)
    photos = masked(instance, tmp_path / "masked")
    run(tiny_model, [(photos, class_manifest(class_images, 3))], tmp_path / "run", max_steps=1, batch_size=4,
        masked_loss=True, mask_min=mask_min, random_flip=True)
    grad = calls[0]["pred"].grad
    assert grad.shape == (8, 4, 8, 8)
    flips = [flipped(p) for p in range(4)]
    assert True in flips and False in flips
    for i, flip in enumerate(flips):
        subject, background = (grad[i, ..., 4:], grad[i, ..., :4]) if flip else (grad[i, ..., :4], grad[i, ..., 4:])
        assert (subject != 0).all()
        if mask_min:
            assert (background != 0).all() and background.abs().mean() < subject.abs().mean()
        else:
            assert (background == 0).all()
    assert (grad[4:] != 0).all(), "class images are learned whole"


def test_masked_loss_weights_are_the_area_average_of_the_mask_at_latent_size(tiny_model, instance, tmp_path):
    module = train.DreamBooth(checkpoint.load(tiny_model[0], tokenizer=tiny_model[1]),
                              settings(masked_loss=True, mask_min=0.2))
    module.instance_latents = {"mean": torch.zeros(1, 4, 2, 2)}
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1  # the top left latent pixel all subject, the top right a quarter
    mask[..., :4, 8:12] = 1
    w = module._latent_masks(mask)
    expected = torch.tensor([[1.0, 0.2 + 0.8 * 0.25], [0.2, 0.2]])
    assert torch.allclose(w["mask"][0, 0], expected) and torch.allclose(w["mask_flip"][0, 0], expected.flip(-1))


def test_masked_loss_without_any_mask_says_how_to_give_them(instance, caplog):
    with pytest.raises(DreampipeError, match=r"train\.masked_loss is true but no photo in .* has a subject mask: put "
                                             r"name\.mask\.png"):
        train.DreamBoothData([(instance, None)], settings(masked_loss=True))


def test_images_without_a_mask_are_learned_whole_with_a_warning(instance, tmp_path, caplog):
    photos = masked(instance, tmp_path / "masked", n=4)
    manifest = json.loads((photos / "manifest.json").read_text())
    del manifest[1]["mask"]
    (photos / "manifest.json").write_text(json.dumps(manifest))
    data = train.DreamBoothData([(photos, None)], settings(masked_loss=True))
    assert data.instance_masks.shape == (4, 1, 64, 64)
    assert (data.instance_masks[1] == 1).all() and (data.instance_masks[0, ..., 32:] == 0).all()
    assert "1 instance image(s) have no subject mask and are learned whole" in caplog.text
    assert train.DreamBoothData([(photos, None)], settings()).instance_masks is None


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    from dreampipe import losses

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = torch.tensor([0, 50, 300, 999])
    w_eps = losses.min_snr_weight(alphas, t, 5.0)
    w_v = losses.min_snr_weight(alphas, t, 5.0, "v_prediction")
    for i, step in enumerate(t.tolist()):
        snr = float(alphas[step] / (1 - alphas[step]))
        assert w_eps[i].item() == pytest.approx(min(snr, 5.0) / snr, rel=1e-5)
        assert w_v[i].item() == pytest.approx(min(snr, 5.0) / (snr + 1), rel=1e-5)
    assert w_eps[0] < 0.01 and w_eps[-1] == 1.0  # clean timesteps weigh little, noisy ones fully


def test_the_loss_changes_with_snr_gamma_and_null_is_the_plain_mse(tiny_model):
    model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])
    plain = train.DreamBooth(model, settings()).noise_loss(pred, target, t)
    assert torch.allclose(plain.mean(), torch.nn.functional.mse_loss(pred, target))
    assert torch.allclose(plain, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    module = train.DreamBooth(model, settings(snr_gamma=5.0))
    weighted = module.noise_loss(pred, target, t)
    alphas = module.noise_scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    assert torch.allclose(weighted, plain * snr.clamp(max=5) / snr)
    assert weighted[0] < plain[0] / 10 and weighted[2] == plain[2]


def test_snr_gamma_reaches_training(tiny_model, instance, tmp_path):
    """A small gamma, so that items of one batch weigh differently (Adam does not see a scale
    common to every gradient)."""
    plain = run(tiny_model, [(instance, None)], tmp_path / "plain", max_steps=3, batch_size=2)
    weighted = run(tiny_model, [(instance, None)], tmp_path / "weighted", max_steps=3, batch_size=2, snr_gamma=0.5)
    assert not identical(part(plain, UNET), part(weighted, UNET))


def test_caption_dropout_is_a_draw_of_the_seed_and_the_position():
    draws = [train.caption_dropped(0, p, 0.3) for p in range(400)]
    assert draws == [train.caption_dropped(0, p, 0.3) for p in range(400)]
    assert 80 < sum(draws) < 160
    assert draws != [train.caption_dropped(1, p, 0.3) for p in range(400)]
    assert not any(train.caption_dropped(0, p, 0.0) for p in range(400))
    assert all(train.caption_dropped(0, p, 1.0) for p in range(400))


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_caption_dropout_gives_instance_items_the_empty_caption(tiny_model, instance, class_images, tmp_path,
                                                                monkeypatch, dropout):
    calls = recording_unet(monkeypatch)
    run(tiny_model, [(instance, class_manifest(class_images, 3))], tmp_path, max_steps=1, batch_size=6,
        caption_dropout=dropout)
    context, model = calls[0]["context"], calls[0]["model"]
    with torch.no_grad():
        empty, robot = sampling.encode_prompts(model, ["", "a photo of a robot"])
    dropped = [torch.equal(c, empty) for c in context[:6]]
    assert dropped == [train.caption_dropped(0, p, dropout) for p in range(6)]
    if dropout == 0.5:
        assert True in dropped and False in dropped
    assert all(torch.equal(c, robot) for c in context[6:]), "class images keep their caption"


# ---- validation loss ---------------------------------------------------------------------------

def val_losses(folder: Path) -> dict[int, float]:
    rows = [r.split(",") for r in (folder / "train" / "loss.csv").read_text().splitlines()[1:]]
    return {int(r[0]): float(r[4]) for r in rows if r[4]}


def test_validation_loss_is_written_at_its_steps_and_never_changes_the_weights(tiny_model, instance, class_images,
                                                                               tmp_path):
    # the draws that validation could disturb are all on: class images, flips, offset noise, EMA
    subjects = [(instance, class_manifest(class_images, 3))]
    common = dict(max_steps=5, random_flip=True, offset_noise=0.1, ema=True)
    on = run(tiny_model, subjects, tmp_path / "on", validation_every_n_steps=2, **common)
    off = run(tiny_model, subjects, tmp_path / "off", validation_every_n_steps=0, **common)
    assert identical(on, off)
    assert losses(tmp_path / "on", 1) == losses(tmp_path / "off", 1), "the same training draws"
    measured = val_losses(tmp_path / "on")
    assert sorted(measured) == [2, 4, 5], "every 2 steps and at the last"
    assert val_losses(tmp_path / "off") == {}
    assert all(0 < v < 10 for v in measured.values())
    again = run(tiny_model, subjects, tmp_path / "again", validation_every_n_steps=2, **common)
    assert identical(again, on) and val_losses(tmp_path / "again") == measured, "fixed draws: the same figure"


@pytest.mark.parametrize("held_out", [0, 1])
def test_validation_loss_weighs_as_the_instance_loss_does(tiny_model, instance, tmp_path, monkeypatch, held_out):
    """With masks (and Min-SNR) the validation loss is the instance loss's objective: the left
    half of each picture is the subject, so only it counts, for training and held-out photos."""
    photos, seen, noise_loss = masked(instance, tmp_path / "masked"), [], train.DreamBooth.noise_loss

    def spy(self, pred, target, timesteps, weights=None):
        seen.append(weights)
        return noise_loss(self, pred, target, timesteps, weights)

    monkeypatch.setattr(train.DreamBooth, "noise_loss", spy)
    run(tiny_model, [(photos, None)], tmp_path / "run", max_steps=1, masked_loss=True, snr_gamma=5.0,
        validation_every_n_steps=1, validation_photos=held_out)
    weights = seen[-1]  # measured after the step
    assert weights.shape[0] == train.VALIDATION_ITEMS
    assert (weights[..., :4] == 1).all() and (weights[..., 4:] == 0).all()


def test_validation_loss_goes_on_the_loss_plot_and_older_rows_without_it_still_plot(tmp_path):
    csv, png = tmp_path / "loss.csv", tmp_path / "loss.png"
    csv.write_text("step,loss,instance_loss,prior_loss,val_loss\n1,0.5,0.5,nan\n2,0.4,0.4,nan,\n3,0.3,0.3,nan,0.35\n")
    train.plot_loss(csv, png)
    plain = tmp_path / "plain.csv"
    plain.write_text("step,loss,instance_loss,prior_loss\n1,0.5,0.5,nan\n2,0.4,0.4,nan\n3,0.3,0.3,nan\n")
    train.plot_loss(plain, tmp_path / "plain.png")
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "plain.png")))


def test_held_out_photos_are_never_drawn_for_training(instance, tmp_path):
    s = settings(validation_photos=2)
    data = train.DreamBoothData([(instance, None)], s)
    manifest = json.loads((instance / "manifest.json").read_text())
    held = [sampling.from_pil([Image.open(instance / m["file"]).convert("RGB")])[0] for m in manifest[-2:]]
    assert data.instance_counts == [len(manifest) - 2]
    assert torch.equal(data.validation_images, torch.stack(held))
    assert not any(torch.equal(img, h) for img in data.instance_images for h in held)
    drawn = {i for b in train.StepIndices(s, data.instance_counts, data.class_counts, 0, 50) for i in b["instance"]}
    assert drawn == set(range(len(manifest) - 2)), "the training draws index only the photos kept"
    with pytest.raises(DreampipeError, match=r"manifest\.json: train\.validation_photos is 6 .* leaves none to train"):
        train.DreamBoothData([(instance, None)], settings(validation_photos=len(manifest)))


def test_held_out_photos_make_the_validation_batch(tiny_model, instance, tmp_path):
    shared = run(tiny_model, [(instance, None)], tmp_path / "shared", max_steps=2, validation_every_n_steps=1)
    held = run(tiny_model, [(instance, None)], tmp_path / "held", max_steps=2, validation_every_n_steps=1,
               validation_photos=2)
    assert not identical(shared, held), "two photos fewer to train on"
    assert val_losses(tmp_path / "held").keys() == {1, 2}
    assert val_losses(tmp_path / "held") != val_losses(tmp_path / "shared")


# ---- prior preservation by the base model's prediction -----------------------------------------

def test_prior_prediction_targets_the_frozen_base_models_prediction(tiny_model, instance, tmp_path):
    subjects = [(instance, None)]
    run(tiny_model, subjects, tmp_path, max_steps=3, learning_rate=1e-3, keep_state=True,
        save_state_every_n_steps=2, prior_prediction=["a photo of a robot"])
    prior = losses(tmp_path, 3)
    # the first step's loss is computed before any update: the trained UNet is the base one
    assert prior[0] == 0 and losses(tmp_path, 2)[0] > 0.01
    assert all(p > 0 for p in prior[1:]), "the target is the base model's, not the trained one's"
    state = torch.load(tmp_path / ".state" / train.STATE_FILE, weights_only=True)
    assert all(k.startswith("unet.") for k in state["state_dict"]), "no frozen copy in the saved state"


def test_a_lora_takes_its_prior_prediction_from_its_own_unet_with_the_adapters_off(tiny_model, instance, tmp_path,
                                                                                    monkeypatch):
    """No frozen copy for a LoRA: its UNet with the adapters bypassed is the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dreampipe import lora_training

    copies = []
    monkeypatch.setattr(train, "frozen_copy", lambda *a: copies.append(a))
    run(tiny_model, [(instance, None)], tmp_path, max_steps=3, method="lora", lora_rank=4, lora_learning_rate=1e-2,
        prior_prediction=["a photo of a robot"])
    prior = losses(tmp_path, 3)
    assert not copies and prior[0] == 0 and all(p > 0 for p in prior[1:])

    model = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1])
    adapters = lora_training.Adapters(model, settings(method="lora", lora_rank=4))
    for name, p in model.unet.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    base = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1]).unet
    with torch.no_grad(), adapters.off(model.unet):
        assert all(m.disable_adapters for m in model.unet.modules() if isinstance(m, BaseTunerLayer))
        assert torch.allclose(model.unet(x, t, ctx).sample, base(x, t, ctx).sample, atol=1e-6)
    assert not any(m.disable_adapters for m in model.unet.modules() if isinstance(m, BaseTunerLayer))
    assert all(p.requires_grad for n, p in model.unet.named_parameters() if ".lora_" in n)


def test_the_frozen_copy_is_the_unet_as_it_was_and_shares_nothing_with_it(tiny_model):
    unet = checkpoint.load(tiny_model[0], tokenizer=tiny_model[1]).unet.eval()
    base = train.frozen_copy(unet, torch.device("cpu"))
    loaded = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, ctx).sample  # equal weights; CPU kernels may sum in another order (5e-5 apart seen)
        assert torch.allclose(base(x, t, ctx).sample, before, atol=1e-3)
        for p in unet.parameters():
            p.add_(0.1)  # training moves the UNet; the copy stays the base
        assert not torch.allclose(unet(x, t, ctx).sample, before, atol=1e-2)
        assert torch.allclose(base(x, t, ctx).sample, before, atol=1e-3)
    assert identical(base.state_dict(), loaded), "the copy holds the weights as loaded, bit for bit"
    assert not any(p.requires_grad for p in base.parameters()) and not base.training


def test_prior_prediction_shapes_the_weights_and_the_prior_loss_weight_applies(tiny_model, instance, tmp_path):
    subjects, pp = [(instance, None)], ["a photo of a robot"]
    none = run(tiny_model, subjects, tmp_path / "none", max_steps=3, learning_rate=1e-3)
    zero = run(tiny_model, subjects, tmp_path / "zero", max_steps=3, learning_rate=1e-3, prior_prediction=pp,
               prior_loss_weight=0.0)
    one = run(tiny_model, subjects, tmp_path / "one", max_steps=3, learning_rate=1e-3, prior_prediction=pp)
    travelled = distance(none, load_file(tiny_model[0]))
    assert distance(zero, none) < 0.25 * travelled  # as test_prior_loss_weight_zero_equals_no_class_data
    assert distance(one, none) > distance(zero, none)
    assert train.fingerprint(settings(prior_prediction=pp), [], 1, cache=tmp_path / "c.json") != \
        train.fingerprint(settings(), [], 1, cache=tmp_path / "c.json")


def test_prior_prediction_refuses_class_manifests(instance, class_images):
    with pytest.raises(DreampipeError, match="prior_prediction takes one class prompt per subject"):
        train.DreamBoothData([(instance, class_manifest(class_images, 3))], settings(prior_prediction=["a robot"]))
