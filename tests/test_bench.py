"""Every benchmark entry point runs, at the tiny size on the CPU: an API change breaks CI, not the
next GPU measurement (bench/train_speed.py once broke unseen for a week)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent


def bench(tmp_path, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("args, printed", [
    (["bench/train_speed.py", "default", "--size", "tiny", "--warm", "1", "--steps", "2"], "train-default-auto"),
    (["bench/train_speed.py", "low_memory", "--size", "tiny", "--warm", "1", "--steps", "2", "--profile"],
     "Self CPU time total"),
    (["bench/train_speed.py", "curve", "--size", "tiny", "--steps", "2"], "train-curve"),
    (["bench/train_speed.py", "default", "--size", "tiny", "--warm", "1", "--steps", "2", "--method", "lora",
      "--lora-conv-rank", "4"], "train-default-auto-lora-conv4"),
    (["bench/train_speed.py", "default", "--size", "tiny", "--warm", "1", "--steps", "2", "--prior-prediction",
      "--validation-every", "1"], "train-default-auto-prior_prediction-val1"),
    (["bench/class_images_speed.py", "--size", "tiny", "--compile", "false", "--batch", "2", "--batches", "2",
      "--steps", "2"], "class-images-false"),
    (["bench/class_images_speed.py", "--size", "tiny", "--compile", "false", "--batch", "2", "--batches", "2",
      "--steps", "2", "--sampler", "dpmsolver++", "--cudnn-benchmark", "--layout", "channels-last"],
     "class-images-false-cudnn-channels-last"),
    (["bench/train_cpu.py", "--short", "1", "--steps", "1"], "tiny model train step"),
    (["bench/ddp_numerics.py", "--steps", "1", "--noise"], "| one rank |"),
    (["bench/checkpoint_io.py", "--size", "tiny", "--repeat", "1"], "tiny"),
    (["bench/prepare_speed.py", "--photos", "3", "--size", "300x200", "--resolution", "64", "--workers", "1"],
     "dreampipe"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_bench_entry_point_runs_at_tiny_size(tmp_path, args, printed):
    assert printed in bench(tmp_path, *args)


def test_startup_bench_times_imports_and_loads_of_a_base_model(tmp_path):
    bench(tmp_path, "bench/sd1_base.py", str(tmp_path / "base"), "--size", "tiny")
    out = bench(tmp_path, "bench/startup.py", str(tmp_path / "base" / "sd1-random.safetensors"),
                str(tmp_path / "base" / "tokenizer"))
    assert '"checkpoint.load": ' in out and '"import pytorch_lightning": ' in out


def test_toy_recipes_bench_runs_one_short_recipe(tmp_path):
    out = bench(tmp_path, "bench/toy_recipes.py", "--out", str(tmp_path / "recipes"), "--seeds", "1",
                "--steps", "2", "--recipes", "1")
    assert "| ours (demo config) | 2 |" in out


def test_toy_recipes_bench_runs_a_recipe_given_on_the_command_line_with_its_class_image_count(tmp_path):
    out = bench(tmp_path, "bench/toy_recipes.py", "--out", str(tmp_path / "recipes"), "--seeds", "1",
                "--steps", "2", "--recipe",
                'two class images={"num_class_images": 2, "learning_rate": 1e-4, "prior_loss_weight": 1}')
    assert "| two class images | 2 | 0.0001 / " in out and "| ours (demo config)" not in out
    assert re.search(r"\| 1 \| \d+ \| ", out), "prior_loss_weight, then the seconds of training"
    assert len(json.loads((tmp_path / "recipes" / "class-2.json").read_text())["images"]) == 2


def test_the_gpu_pretraining_script_pretrains_and_checks_at_tiny_size_on_the_cpu(tmp_path):
    """bench/pretrain_toy_gpu.sh up to the check; LIMIT 0 leaves no time for the recipe comparison
    (toy_recipes.py is tested above)."""
    tiny = ('{"vae_steps": 2, "vae_batch_size": 2, "latents": 8, "unet_steps": 2, "unet_batch_size": 2, '
            '"classifier_steps": 2, "classifier_reconstructions": 4, "check_seeds": 2, "check_steps": 2, '
            '"sample_seeds": 1, "cpu_threads": 0}')
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SETTINGS": tiny, "LIMIT": "0"}
    r = subprocess.run(["bash", "bench/pretrain_toy_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "goal (>= 0.9 each):" in (tmp_path / "check.md").read_text()
    assert (tmp_path / "toy-sd" / "toy-sd.safetensors").exists() and "pretrain-toy:" in r.stdout


def test_the_e2e_base_model_is_a_single_file_checkpoint_with_its_tokenizer(tmp_path):
    from dreampipe import checkpoint

    bench(tmp_path, "bench/sd1_base.py", str(tmp_path / "base"), "--size", "tiny")
    path = tmp_path / "base" / "sd1-random.safetensors"
    weights, _ = checkpoint.read_state_dict(path)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}, "as users' files"
    model = checkpoint.load(path, tokenizer=tmp_path / "base" / "tokenizer")
    assert len(model.tokenizer("a photo of sks woman").input_ids) > 2


def test_e2e_photos_are_the_sizes_the_gpu_benchmark_uses(tmp_path):
    from PIL import Image

    bench(tmp_path, "bench/e2e_photos.py", str(tmp_path / "photos"))
    sizes = {Image.open(p).size for p in (tmp_path / "photos").glob("*.jpg")}
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 20 and sizes == {(1200, 1600), (1600, 1200)}
    assert not list((tmp_path / "photos").glob("*.mask.png")), "masks only when asked"


def test_e2e_photos_masks_cover_the_subject(tmp_path):
    import numpy as np
    from PIL import Image

    bench(tmp_path, "bench/e2e_photos.py", str(tmp_path / "photos"), "--masks")
    photo, mask = (np.asarray(Image.open(tmp_path / "photos" / f"photo_01{s}")) for s in (".jpg", ".mask.png"))
    assert mask.shape == photo.shape[:2]
    subject = (np.abs(photo.astype(int) - (150, 40, 200)).max(-1) < 30)  # the ellipse (and a few noise pixels)
    assert (mask[subject] == 255).mean() > 0.9 and (mask[~subject] == 0).mean() > 0.99
    assert abs((mask == 255).mean() - np.pi / 16) < 0.01, "the ellipse of half the width and height"


@pytest.mark.parametrize("script", ["bench/e2e_gpu.sh", "bench/diffusers_example_e2e.sh", "bench/multi_gpu.sh"])
def test_gpu_shell_benchmarks_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def test_toy_recipes_bench_runs_a_lora_recipe_with_its_own_rates(tmp_path):
    out = bench(tmp_path, "bench/toy_recipes.py", "--out", str(tmp_path / "recipes"), "--seeds", "1",
                "--steps", "2", "--recipe",
                'lora={"method": "lora", "lora_rank": 4, "lora_learning_rate": 1e-3, '
                '"lora_text_encoder_learning_rate": 3e-3}')
    assert "| lora | 2 | 0.001 / 0.003 |" in out
    with safe_open(tmp_path / "recipes" / "lora" / "model.safetensors", "pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys()), "a LoRA of the UNet and the text encoder trained"


def test_toy_lora_capacity_bench_scores_a_finetune_as_extracted_loras(tmp_path):
    bench(tmp_path, "bench/toy_recipes.py", "--out", str(tmp_path / "recipes"), "--seeds", "1", "--steps", "2",
          "--recipes", "1")
    recipes = tmp_path / "recipes"
    out = bench(tmp_path, "bench/toy_lora_capacity.py", str(recipes / "ours--demo-config-" / "model.safetensors"),
                "--instance", str(recipes / "instance"), "--out", str(tmp_path / "capacity"), "--seeds", "1")
    assert "| the full finetune itself |" in out
    assert "| extracted at rank 32, + the finetune's token embeddings |" in out
