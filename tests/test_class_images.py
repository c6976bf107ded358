"""Class images: a pure function of (set, index), grown incrementally, shared, resumable after a
kill; or taken from the user's own photos or the instance images; and any count trains."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dreampipe import class_images, train
from dreampipe.errors import DreampipeError
from dreampipe.files import write_json
from dreampipe.images import save_atomic

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a dog"


def generate(tiny_model, store, count, batch_size=2, steps=2, log=print):
    model, tokenizer = tiny_model
    return class_images.run(model, tokenizer, store, store / f"n{count}.json", count, PROMPT, "",
                            "ddim", steps, 10.0, 64, batch_size, log=log)


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def mtimes(store):
    return {p.name: p.stat().st_mtime_ns for p in store.glob("0*.png")}


def test_image_i_does_not_depend_on_the_batch_it_was_made_in(tiny_model, tmp_path):
    generate(tiny_model, tmp_path / "one", 3, batch_size=1, steps=4)
    generate(tiny_model, tmp_path / "three", 3, batch_size=3, steps=4)
    for i in range(3):
        a, b = pixels(tmp_path / "one" / f"{i:05d}.png"), pixels(tmp_path / "three" / f"{i:05d}.png")
        # Same seed, same noise: equal up to the last bit of the CPU kernels, which sum in another
        # order for another batch shape; a few pixels may round to the neighbouring byte.
        assert np.abs(a - b).max() <= 1
        assert (a != b).mean() < 0.02
    assert np.abs(pixels(tmp_path / "one" / "00000.png") - pixels(tmp_path / "one" / "00001.png")).mean() > 5, \
        "each index has its own seed"


def test_growing_the_count_makes_only_the_missing_indexes_and_shrinking_makes_none(tiny_model, tmp_path):
    store = tmp_path / "set"
    assert generate(tiny_model, store, 2) == [0, 1]
    before = mtimes(store)

    assert generate(tiny_model, store, 5) == [2, 3, 4]
    after = mtimes(store)
    assert sorted(after) == [f"{i:05d}.png" for i in range(5)]
    assert {k: after[k] for k in before} == before, "existing images were rewritten"

    assert generate(tiny_model, store, 3) == []
    assert mtimes(store) == after, "lowering the count deletes or rewrites nothing"
    manifest = json.loads((store / "n3.json").read_text())
    assert manifest == {"prompt": PROMPT, "images": [str(store / f"{i:05d}.png") for i in range(3)]}
    assert Image.open(store / "n3.png").size[0] > 0, "contact sheet"


def test_a_job_waits_for_another_generating_into_the_same_set_and_then_makes_only_what_is_missing(
        tiny_model, tmp_path):
    store = tmp_path / "set"
    waiting, made = threading.Event(), []
    with class_images.store_lock(store):
        job = threading.Thread(target=lambda: made.append(generate(
            tiny_model, store, 4, log=lambda msg: "waiting" in msg and waiting.set())))
        job.start()
        assert waiting.wait(120), "the second job did not wait for the lock"
        # meanwhile the job holding the lock (a smaller count of the same set) finishes its images
        for i in range(2):
            Image.new("RGB", (64, 64), "red").save(store / f"{i:05d}.png")
    job.join(120)
    assert made == [[2, 3]]
    assert (pixels(store / "00000.png") == [255, 0, 0]).all(), "the other job's image was kept"


def test_a_killed_generation_keeps_its_images_and_the_rerun_completes_the_set(tiny_model, tmp_path, capsys):
    model, tokenizer = tiny_model
    store, count = tmp_path / "set", 5
    cmd = [sys.executable, "-m", "dreampipe.cli", "class-images", "--model", str(model), "--tokenizer",
           str(tokenizer), "--store", str(store), "--manifest", str(store / "n5.json"), "--num", str(count),
           "--prompt", PROMPT, "--steps", "6", "--resolution", "64", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not mtimes(store):
        assert proc.poll() is None, f"class-images exited early:\n{proc.stderr.read()}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = mtimes(store)
    assert 1 <= len(done) < count, "killed mid-run"
    assert not (store / "n5.json").exists()

    made = generate(tiny_model, store, count, steps=6)
    assert made == [i for i in range(count) if f"{i:05d}.png" not in done]
    after = mtimes(store)
    assert len(after) == count and {k: after[k] for k in done} == done
    assert len(json.loads((store / "n5.json").read_text())["images"]) == count
    # the progress bar tells the rate and the time left: "3/3 [00:02<00:00, 1.4img/s]"
    assert re.search(rf"{len(made)}/{len(made)} \[[\d:]+<[\d:]+, +[\d.]+(img/s|s/img)\]", capsys.readouterr().err)


def test_the_set_folder_depends_on_every_setting_that_shapes_the_images_and_on_nothing_else(tmp_path):
    key = dict(model_id="abc", prompt=PROMPT, negative_prompt="", sampler="ddim", steps=50,
               guidance_scale=10, resolution=512)
    folder = class_images.set_dir(tmp_path, **key)
    assert class_images.set_dir(tmp_path, **{**key, "guidance_scale": 10.0}) == folder
    for change in (dict(model_id="abd"), dict(prompt="a photo of a cat"), dict(negative_prompt="blurry"),
                   dict(sampler="dpmsolver++"), dict(steps=30), dict(guidance_scale=7.5), dict(resolution=768)):
        assert class_images.set_dir(tmp_path, **{**key, **change}) != folder, change


def test_class_data_is_a_keyword_or_a_folder_else_the_error_names_the_character_file(tmp_path):
    for word in ("generate", "instance", "none", "prior_prediction"):
        assert class_images.source(word, "alice.yaml") == word
    assert class_images.source(str(tmp_path), "alice.yaml") == "folder"
    with pytest.raises(DreampipeError, match=r"alice\.yaml: class_images\.class_data is 'genrate'"):
        class_images.source("genrate", "alice.yaml")


@pytest.mark.parametrize("n_instance,n_class,batch_size,accumulation", [(3, 7, 1, 1), (5, 13, 2, 3), (1, 1, 1, 1), (6, 1, 3, 1)])
def test_any_class_and_instance_counts_train_for_exactly_max_steps(n_instance, n_class, batch_size, accumulation):
    settings = {"batch_size": batch_size, "seed": 0, "random_flip": False}
    max_steps = 11
    batches = list(train.StepIndices(settings, [n_instance], [n_class], 0, max_steps * accumulation))
    assert len(batches) == max_steps * accumulation
    classes = [int(i) for b in batches for i in b["class"]]
    assert len(classes) == max_steps * accumulation * batch_size
    # class images cycle in shuffled passes on their own: each pass uses every one of them once
    assert sorted(classes[:n_class]) == list(range(n_class))
    assert all(len(b["instance"]) == batch_size for b in batches)


def test_each_class_data_source_reaches_training(workflow):
    """generate (two characters sharing one set), the user's own photos, the instance images, none."""
    photos_dir = workflow.path / "my_class_photos"
    photos_dir.mkdir()
    for i in range(4):
        Image.new("RGB", (90, 60), (40 * i, 0, 0)).save(photos_dir / f"dog{i}.png")
    workflow.character("gen1")
    workflow.character("gen2", token="sks")
    workflow.character("mine", class_images={"class_data": "my_class_photos"})
    workflow.character("inst", class_images={"class_data": "instance"})
    workflow.character("nopp", class_images={"class_data": "none"})

    plan = workflow.snakemake("-n", "-p").stdout
    commands = {}
    for line in plan.splitlines():
        if line.startswith("Shell command: dreampipe train "):
            args = shlex.split(line.split(": ", 1)[1])
            name = Path(args[args.index("--instance-dir") + 1]).parent.parent.name
            commands[name] = args[args.index("--class-manifest") + 1] if "--class-manifest" in args else None
    assert sorted(commands) == ["gen1", "gen2", "inst", "mine", "nopp"]
    assert commands["gen1"] == commands["gen2"] and commands["gen1"].startswith("results/class/")
    assert plan.count("dreampipe class-images --model") == 1, "the shared set is made by one job"
    assert commands["nopp"] is None

    manifests = [m for m in commands.values() if m]
    workflow.snakemake("-p", *manifests)  # a flag ends --resources, so the targets follow
    out = {name: json.loads((workflow.path / m).read_text()) for name, m in commands.items() if m}
    assert all(m["prompt"] == "a photo of a robot" for m in out.values())
    assert len(out["gen1"]["images"]) == 3
    assert out["inst"]["images"] == [f"results/inst/instance/0/{i:04d}.png" for i in range(6)]
    assert out["mine"]["images"] == [f"results/mine/class_photos/{i:04d}.png" for i in range(4)]
    assert Image.open(workflow.path / out["mine"]["images"][0]).size == (64, 64), "prepared like instance photos"

    # the batch size changes the speed, not the images: changing it reruns nothing
    workflow.character("gen1", class_images={"batch_size": 1})
    workflow.character("gen2", token="sks", class_images={"batch_size": 1})
    assert "Nothing to be done" in workflow.snakemake("-n", *manifests).stdout

    (workflow.path / "config/characters/bad.yaml").write_text(yaml.safe_dump(
        {"instance_dir": "example/photos", "token": "zxq", "class_word": "robot",
         "class_images": {"class_data": "my_class_foto"}}))
    r = workflow.snakemake("-n", check=False)
    assert r.returncode != 0
    assert "config/characters/bad.yaml: class_images.class_data is 'my_class_foto'" in r.stdout + r.stderr


def test_prior_prediction_plans_no_class_images_and_tells_training_each_class_prompt(workflow):
    (workflow.path / "config/characters/pp.yaml").write_text(yaml.safe_dump(
        {"class_images": {"class_data": "prior_prediction"},
         "subjects": [{"instance_dir": "example/photos", "token": "zxq", "class_word": "robot"},
                      {"instance_dir": "example/photos", "token": "sks", "class_word": "dog"}]}))
    plan = workflow.snakemake("-n", "-p").stdout
    assert "class_images" not in {rule for rule, _ in workflow.planned()} and "dreampipe class-images" not in plan
    train_line = next(line for line in plan.splitlines() if line.startswith("Shell command: dreampipe train "))
    args = shlex.split(train_line.split(": ", 1)[1])
    assert "--class-manifest" not in args and args.count("--instance-dir") == 2
    settings = json.loads(args[args.index("--settings") + 1])
    assert settings["prior_prediction"] == ["a photo of a robot", "a photo of a dog"]


def test_the_manifest_is_written_under_the_store_lock(tiny_model, tmp_path):
    store = tmp_path / "set"
    generate(tiny_model, store, 2)
    (store / "n2.json").unlink()
    waiting = threading.Event()
    with class_images.store_lock(store):
        job = threading.Thread(target=lambda: generate(tiny_model, store, 2,
                                                       log=lambda msg: "waiting" in msg and waiting.set()))
        job.start()
        assert waiting.wait(120), "the job did not wait for the lock"
        assert not (store / "n2.json").exists(), "the manifest was written while another job held the set"
    job.join(120)
    assert json.loads((store / "n2.json").read_text())["images"][1].endswith("00001.png")


@pytest.mark.parametrize("write", [
    lambda path, i: write_json({"i": i}, path),
    lambda path, i: save_atomic(Image.new("RGB", (8, 8), (i % 256, 0, 0)), path)])
def test_two_writers_of_one_file_never_touch_each_others_temporary_file(tmp_path, write):
    errors = []

    def writer():
        for i in range(200):
            try:
                write(tmp_path / "n3.json", i)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["n3.json"], "no temporary file is left behind"


@pytest.mark.parametrize("compiled, sizes", [(True, [2, 2, 2]), (False, [2, 2, 1])])
def test_on_a_gpu_every_batch_has_the_full_size_when_compiled(tiny_model, tmp_path, monkeypatch, compiled, sizes):
    """A compiled graph has one shape: the last, smaller batch is padded, and the padding is not kept.
    Eager, the padding would only cost time."""
    from dreampipe import sampling, speed

    seen, sample = [], sampling.generate
    monkeypatch.setattr(speed, "on_gpu", lambda device: True)
    monkeypatch.setattr(speed, "prepare_sampling", lambda *a, **k: None)
    monkeypatch.setattr(class_images, "COMPILE_FROM_IMAGE_STEPS", 1 if compiled else 10**9)
    monkeypatch.setattr(sampling, "generate", lambda model, prompts, seeds, **k: (seen.append(len(seeds)),
                                                                                   sample(model, prompts, seeds, **k))[1])
    made = generate(tiny_model, tmp_path / "store", 5, batch_size=2)
    assert seen == sizes
    assert made == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "store").glob("0*.png")) == [f"{i:05d}.png" for i in range(5)]


def test_pngs_are_written_beside_sampling_whole_and_equal_to_what_was_sampled(tiny_model, tmp_path, monkeypatch):
    """The PNG encoding of a batch runs in writer threads while the next batch samples; each file
    appears complete (atomic rename) and holds exactly the sampled pixels."""
    from dreampipe import images, sampling

    writers, sampled, save, sample = set(), {}, images.save_atomic, sampling.generate

    def slow_save(image, path):
        if Path(path).name.startswith("0"):  # a class image, not the contact sheet
            writers.add(threading.get_ident())
            time.sleep(0.05)
        save(image, path)

    def remember(model, prompts, seeds, **k):
        out = sample(model, prompts, seeds, **k)
        sampled.update({s: np.asarray(im).astype(int) for s, im in zip(seeds, out)})
        return out

    monkeypatch.setattr(images, "save_atomic", slow_save)
    monkeypatch.setattr(sampling, "generate", remember)
    generate(tiny_model, tmp_path / "set", 5, batch_size=2)
    assert writers and threading.get_ident() not in writers, "PNGs are written by the sampling thread"
    assert sorted(p.name for p in (tmp_path / "set").iterdir() if not p.name.startswith("n5.")) == \
        [".lock"] + [f"{i:05d}.png" for i in range(5)], "no temporary file is left behind"
    for i in range(5):
        assert (pixels(tmp_path / "set" / f"{i:05d}.png") == sampled[i]).all()


def test_a_failed_png_write_fails_the_job(tiny_model, tmp_path, monkeypatch):
    from dreampipe import images

    def full_disk(image, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images, "save_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate(tiny_model, tmp_path / "set", 3, batch_size=2)


def test_the_log_tells_the_seconds_of_load_sampling_writing_and_contact_sheet_apart(tiny_model, tmp_path):
    lines = []
    generate(tiny_model, tmp_path / "set", 3, batch_size=2, log=lines.append)
    assert any(re.fullmatch(r"class images: model loaded in [\d.]+ s, 3 sampled in [\d.]+ s \([\d.]+ img/s\), "
                            r"PNGs written in [\d.]+ s by \d writer threads beside sampling, "
                            r"[\d.]+ s past the last batch", line) for line in lines), lines
    assert any(re.fullmatch(r"class images: manifest and contact sheet of 3 written in [\d.]+ s", line)
               for line in lines), lines
