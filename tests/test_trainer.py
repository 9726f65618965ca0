"""trainer.py on a tiny VQGAN (vq-f4-tiny, 32 px -> 4x8x8 latents) and the tiny UNet, over the 12-image
`image_folder`: the loss falls, resume is bit-exact, the latent cache is reused and invalidated, text conditioning
samples through diffusion.py, torchrun runs two CPU processes, SIGTERM and NaN leave loadable checkpoints, and bad
input is one clear line."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import diffusion
import latent_cache
import trainer
import training_loop
import unet_training
from checkpoints import load_state_dir, save_state_dir
from cli import UserError
from conftest import ROOT, sigterm_after_log_lines
from diffusion import load_diffusion_model
from images import image_to_tensor
from schedule import NoiseSchedule
from training_loop import ema_decay, lr_factor, seed_everything, update_ema
from vqgan import CONFIGS, VQModel, load_vqgan, save_vqgan

FAST = ["--unet_size", "tiny", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--no-bf16",
        "--lr", "1e-3", "--warmup_steps", "0", "--sample_every", "0", "--log_every", "1", "--save_every", "1000"]


def write_vqgan(path, seed=0, latent_scale=1.0):
    torch.manual_seed(seed)
    save_vqgan(VQModel({**CONFIGS["vq-f4-tiny"], "latent_scale": latent_scale}), path)
    return path


@pytest.fixture
def vqgan(tmp_path):
    return write_vqgan(tmp_path / "vqgan")


def train(data, vqgan, out, *flags):
    return trainer.main(["--dataset_path", str(data), "--vqgan_ckpt", str(vqgan), "--output_dir", str(out), *FAST,
                         *map(str, flags)])


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def log_entries(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Pieces


def test_lr_warmup_then_cosine_and_ema_warmup():
    args = trainer.parse_args(["--dataset_path", "d", "--vqgan_ckpt", "v", "--lr", "1e-3", "--warmup_steps", "4",
                               "--max_steps", "14", "--lr_schedule", "cosine", "--min_lr", "1e-4"])
    factors = [trainer.lr_schedule_of(args)(step) for step in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert factors[14] == factors[15] == pytest.approx(0.1)  # min_lr / lr at the end and after
    assert [lr_factor(step, 4, 14, "constant") for step in (3, 4, 100)] == [1.0, 1.0, 1.0]
    assert ema_decay(0, 0.9999) == pytest.approx(0.1) and ema_decay(90, 0.9999) == pytest.approx(0.91)
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(0, 0.999, warm_start=True) == ema_decay(500, 0.999, warm_start=True) == 0.999
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * ema.weight.detach() + 0.1 * model.weight.detach()
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, expected)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        trainer.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--dataset_path", "--vqgan_ckpt", "--unet_size", "--schedule", "--prediction_type",
                 "--min_snr_gamma", "--zero_terminal_snr", "--latent_cache", "--caption_template", "--cond_drop",
                 "--resume", "--keep_last", "--sample_every", "--grad_accum", "--ema_decay", "--bf16", "--device"):
        assert flag in text
    assert "(default: 0.1)" in text and "(default: small)" in text and "(default: 0.999)" in text


# ----------------------------------------------------------------------------------------------
# Training runs


def test_loss_falls_and_run_writes_checkpoints_samples_log_and_export(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 50, "--save_every", 20, "--keep_last", 2,
                 "--sample_every", 25, "--num_samples", 2, "--sample_steps", 3) == 0
    log = log_entries(out)
    assert [e["step"] for e in log] == list(range(1, 51))
    assert {"step", "loss", "lr", "samples_per_s", "steps_per_s", "grad_norm", "epoch"} <= set(log[0])
    first, last = (sum(e["loss"] for e in part) / 10 for part in (log[:10], log[-10:]))
    assert 0.8 < first < 1.2 and last < 0.75 * first  # zero-initialised output: loss starts at E[eps^2] = 1
    assert checkpoints(out) == ["step_0000040", "step_0000050"]  # every 20 steps and at the end, last 2 kept
    for name in ("step_0000025.png", "step_0000050.png"):
        with Image.open(out / "samples" / name) as grid:
            assert grid.size == (64, 32) and grid.text["step"] == name[5:12].lstrip("0")
    with Image.open(out / "loss.png") as curve:
        assert curve.format == "PNG"

    state = load_state_dir(out / "checkpoints" / "step_0000050")
    assert state["step"] == 50 and len(state["rng"]) == 1 and state["lr_scheduler"]["last_epoch"] == 50
    assert state["config"]["training"]["args"]["max_steps"] == 50 and state["optimizer"]["state"]
    export = json.loads((out / "unet.json").read_text())
    assert export["vqgan"] == "../vqgan" and export["training"]["step"] == 50  # relative to the checkpoint's folder
    assert export["latent_shape"] == [4, 8, 8] and export["prediction_type"] == "epsilon"
    pipeline = load_diffusion_model(out / "unet", "cpu")
    weight = "conv_out.weight"
    assert pipeline.config["weights"] == "ema" and torch.equal(pipeline.unet.state_dict()[weight], state["ema"][weight])
    assert not torch.equal(state["ema"][weight], state["model"][weight])
    assert pipeline.generate(1, seed=0, sampler="ddim", steps=2, progress=False).shape == (1, 3, 32, 32)


def test_resume_continues_bit_exactly(tmp_path, image_folder, vqgan):
    """6 steps straight vs 3 steps + resume from that checkpoint + 3 steps (cosine LR, warm-up, accumulation over
    epoch boundaries, v prediction, min-SNR, bf16): the same weights, EMA and optimizer state, bit for bit."""
    flags = ["--max_steps", 6, "--save_every", 3, "--keep_last", 5, "--lr_schedule", "cosine", "--warmup_steps", 2,
             "--grad_accum", 2, "--prediction_type", "v", "--min_snr_gamma", 5, "--bf16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the straight run also samples: sampling must not disturb the training's random streams
    assert train(image_folder, vqgan, straight, *flags, "--sample_every", 2, "--num_samples", 1,
                 "--sample_steps", 2) == 0
    assert train(image_folder, vqgan, resumed, *flags, "--resume", straight / "checkpoints" / "step_0000003",
                 "--latent_cache", straight / "latent_cache") == 0
    a = load_state_dir(straight / "checkpoints" / "step_0000006")
    b = load_state_dir(resumed / "checkpoints" / "step_0000006")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for index, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][index][k]) for k, v in moments.items())
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert [e["loss"] for e in log_entries(straight)[3:]] == [e["loss"] for e in log_entries(resumed)]
    halfway = load_state_dir(straight / "checkpoints" / "step_0000003")
    assert not torch.equal(halfway["model"]["conv_out.weight"], a["model"]["conv_out.weight"])


def test_latent_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path, image_folder, vqgan, capsys,
                                                                   monkeypatch):
    cache_path = tmp_path / "cache"

    def run(name, *flags):
        assert train(image_folder, vqgan, tmp_path / name, "--max_steps", 1, "--latent_cache", cache_path, *flags) == 0
        return load_state_dir(cache_path), capsys.readouterr().out

    cache, output = run("a")
    assert "encoded 12 images" in output
    latents = cache["latents"]
    assert latents.shape == (12, 2, 4, 8, 8) and latents.dtype == torch.float16
    model = load_vqgan(vqgan)
    with Image.open(image_folder / "00000003.png") as img:
        image = image_to_tensor(img.convert("RGB"), 32)[None]
    with torch.no_grad():
        expected = model.encode(torch.cat([image, image.flip(-1)]))  # the image and its mirror image
    assert torch.allclose(latents[3].float(), expected, atol=2e-3)
    assert cache["latent_scale_source"] == "measured"
    assert cache["latent_scale"] == pytest.approx(1 / latents.double().std().item())
    written = (cache_path / "tensors.safetensors").stat().st_mtime_ns

    def no_encoding(*_):
        raise AssertionError("the VQGAN encoder ran although the cache is valid")

    monkeypatch.setattr(VQModel, "encode", no_encoding)
    _, output = run("b")
    assert f"reusing {cache_path}" in output and (cache_path / "tensors.safetensors").stat().st_mtime_ns == written
    for image in image_folder.iterdir():  # the same files copied anew (new modification times): the same data set
        os.utime(image, ns=(1_000_000_000, 1_000_000_000))
    _, output = run("b2")
    assert f"reusing {cache_path}" in output
    model = load_vqgan(vqgan)
    with torch.no_grad():  # a fine-tuned decoder (vqgan.py --finetune_decoder) leaves the latents as they were
        model.decoder.conv_out.weight.add_(0.1)
    save_vqgan(model, vqgan)
    _, output = run("b3")
    assert f"reusing {cache_path}" in output
    monkeypatch.undo()

    write_vqgan(vqgan, seed=1, latent_scale=0.5)  # another VQGAN, with a latent scale of its own
    cache, output = run("c")
    assert "built for another vqgan: re-encoding" in output
    assert not torch.equal(cache["latents"], latents)
    assert cache["latent_scale"] == 0.5 and cache["latent_scale_source"] == "vqgan"

    cache, output = run("d", "--max_images", 6)
    assert "built for another max_images" in output and len(cache["latents"]) == 6
    (image_folder / "00000000.png").write_bytes(b"not a png")  # an edited data set; that image is now unreadable
    cache, output = run("e", "--max_images", 6)
    assert "built for another dataset" in output and len(cache["latents"]) == 5 and cache["skipped"] == 1


def test_conditional_training_with_template_captions_samples_with_a_prompt(tmp_path, image_folder, vqgan):
    out = tmp_path / "cond"
    assert train(image_folder, vqgan, out, "--max_steps", 4, "--conditional", "--caption_template",
                 "a {style} painting", "--cond_drop", 0.5, "--max_text_length", 8, "--sample_every", 4,
                 "--num_samples", 2, "--sample_steps", 2) == 0
    cache = load_state_dir(out / "latent_cache")
    assert cache["captions"] == ["a Baroque painting", "a Impressionism painting", "a Expressionism painting"]
    assert cache["caption_ids"].tolist() == [0, 1, 2] * 4
    assert cache["context"].shape == (3, 8, 384) and cache["context_mask"].dtype == torch.bool
    with Image.open(out / "samples" / "step_0000004.png") as grid:
        assert json.loads(grid.text["prompts"]) == ["a Baroque painting", "a Impressionism painting"]
    export = json.loads((out / "unet.json").read_text())
    assert export["unet"]["context_dim"] == 384 and export["text_encoder"] == trainer.DEFAULT_TEXT_ENCODER
    # the null embedding only learns from dropped captions: it moved, so --cond_drop dropped some
    seed_everything(0)
    initial = unet_training.make_unet("tiny", 4, 8, 384)
    trained = load_state_dir(out / "checkpoints" / "step_0000004")["model"]
    assert not torch.equal(initial.null_context.detach(), trained["null_context"])

    samples = tmp_path / "samples"
    assert diffusion.main(["--unet_ckpt_path", str(out / "unet"), "--prompt", "a Baroque painting", "--guidance_scale",
                           "3", "--num_images", "1", "--steps", "2", "--outdir", str(samples), "--device", "cpu"]) == 0
    with Image.open(samples / "00000.png") as img:
        assert img.size == (32, 32) and json.loads(img.text["parameters"])["prompt"] == "a Baroque painting"


def test_wikiart_mini_captions_from_class_labels(tmp_path, wikiart_mini, vqgan):
    """A Hugging Face parquet dataset: --max_images takes the first rows; ClassLabel styles become caption words."""
    out = tmp_path / "wikiart"
    assert train(wikiart_mini, vqgan, out, "--max_steps", 1, "--max_images", 8, "--resolution", 32, "--conditional",
                 "--caption_template", "a {style} painting", "--max_text_length", 8) == 0
    cache = load_state_dir(out / "latent_cache")
    assert cache["latents"].shape == (8, 2, 4, 8, 8) and cache["identity"]["dataset"]["rows"] == 10010
    styles = {"Art Nouveau Modern", "Baroque", "Expressionism", "Impressionism", "Post-Impressionism", "Romanticism",
              "Symbolism"}
    assert cache["captions"] and {c[2:-len(" painting")] for c in cache["captions"]} <= styles


def test_torchrun_two_cpu_processes_average_their_gradients_and_write_one_checkpoint(tmp_path, image_folder, vqgan):
    """trainer.py's command under torchrun (through tests/ddp_gradient_probe.py, which records each process's
    gradients): both processes step with the mean of the gradients their own micro-batches give (accumulated over 2
    of them, clipping off), which differ; one checkpoint and log."""
    out, record = tmp_path / "ddp", tmp_path / "gradients"
    record.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/ddp_gradient_probe.py", "--dataset_path", str(image_folder), "--vqgan_ckpt", str(vqgan),
               "--output_dir", str(out), *FAST, "--max_steps", "2", "--grad_accum", "2", "--grad_clip", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIENT_RECORD": str(record)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 accumulation x 2 processes = 16" in result.stdout
    for step in (1, 2):  # step 1: only the output layer, initialised at zero, has a gradient; step 2: 36 tensors
        ranks = [torch.load(record / f"rank{rank}_step{step}.pt") for rank in (0, 1)]
        for stepped_0, stepped_1, alone_0, alone_1 in zip(*(r[key] for key in ("stepped", "alone") for r in ranks)):
            mean, scale = (alone_0 + alone_1) / 2, alone_0.abs().max() + alone_1.abs().max() + 1e-12
            assert torch.equal(stepped_0, stepped_1) and (stepped_0 - mean).abs().max() < 1e-5 * scale
        spread = [(a - b).norm() / (a + b).norm() for a, b in zip(ranks[0]["alone"], ranks[1]["alone"]) if a.any()]
        assert min(spread) > 0.01  # the two processes' own gradients differ: their mean is a real average
    assert checkpoints(out) == ["step_0000002"] and [e["step"] for e in log_entries(out)] == [1, 2]
    state = load_state_dir(out / "checkpoints" / "step_0000002")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert load_diffusion_model(out / "unet", "cpu").config["training"]["step"] == 2


def test_sigterm_saves_a_checkpoint_and_resume_auto_continues_it(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    returncode, stdout, stderr = sigterm_after_log_lines(
        ["trainer.py", "--dataset_path", image_folder, "--vqgan_ckpt", vqgan, "--output_dir", out, *FAST, "--max_steps",
         100000], out / "log.jsonl", 3)
    assert returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    (saved,) = checkpoints(out)
    step = int(saved[5:])
    assert step >= 3 and log_entries(out)[-1]["step"] == step
    assert load_state_dir(out / "checkpoints" / saved)["step"] == step
    assert load_diffusion_model(out / "unet", "cpu").config["training"]["step"] == step
    assert train(image_folder, vqgan, out, "--resume", "auto", "--max_steps", step + 2) == 0
    assert checkpoints(out)[-1] == f"step_{step + 2:07d}"
    assert [e["step"] for e in log_entries(out)] == list(range(1, step + 3))


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"loss is (nan|inf) at step (\d+): training diverged") as err:
        train(image_folder, vqgan, out, "--lr", "1e30", "--max_steps", 20, "--save_every", 1, "--keep_last", 50)
    failed = int(err.value.args[0].split(" at step ")[1].split(":")[0])
    saved = checkpoints(out)
    assert saved and saved[-1] == f"step_{failed - 1:07d}" and str(out / "checkpoints" / saved[-1]) in str(err.value)
    assert load_state_dir(out / "checkpoints" / saved[-1])["step"] == failed - 1
    assert load_diffusion_model(out / "unet", "cpu").config["training"]["step"] == failed - 1


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("flags,message", [
    (["--dataset_path", "MISSING"], "dataset not found"),
    (["--vqgan_ckpt", "MISSING"], "VQGAN weights not found"),
    (["--dataset_path", "EMPTY"], "no images found"),
    (["--conditional", "--caption_column", "caption"], r"'caption' is not in the dataset \(columns: style\)"),
    (["--conditional", "--caption_template", "a {style} by {artist}"],
     r"artist, not in the dataset \(columns: style\)"),
    (["--conditional"], "exactly one of --caption_column and --caption_template"),
    (["--caption_column", "style"], "need --conditional"),
    (["--resolution", "30"], "--resolution 30 is not a multiple of the VQGAN's downsampling factor 4"),
    (["--resolution", "24", "--unet_size", "small"], "cannot be halved"),  # 6x6 latents, 3 halvings
    (["--zero_terminal_snr"], "needs --prediction_type v"),
    (["--batch_size", "0"], "argument --batch_size: must be at least 1, got 0"),
    (["--max_steps", "-1"], "argument --max_steps: must be at least 0, got -1"),
    (["--guidance_scale", "-2"], "argument --guidance_scale: must be at least 0, got -2"),
    (["--beta_start", "0"], r"beta_start must be in \(0, 1\), got 0.0"),
    (["--beta_end", "1.5"], r"beta_end must be in \(0, 1\), got 1.5"),
    (["--timestep_loc", "1"], "need --timestep_sampling logit-normal or laplace"),
    (["--timestep_sampling", "laplace", "--timestep_scale", "0"],
     "argument --timestep_scale: must be greater than 0, got 0"),
    (["--repa_until", "5"], "--repa_layer and --repa_until need --repa_weight"),
    (["--repa_weight", "0.5", "--repa_image_size", "100"], "--repa_image_size must be a multiple of 32"),
    (["--repa_weight", "0.5", "--repa_layer", "mid"], r"--repa_layer mid: no such UNet stage \(choose from down.0"),
    (["--cond_drop", "1"], "--cond_drop"),
    (["--resume", "MISSING"], "no such checkpoint folder"),
])
def test_bad_input_is_one_clear_error_before_training(tmp_path, image_folder, vqgan, flags, message):
    (tmp_path / "empty").mkdir()
    replace = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}
    flags = [replace.get(f, f) for f in flags]
    base = {"--dataset_path": str(image_folder), "--vqgan_ckpt": str(vqgan)}
    for flag in base:
        if flag in flags:
            base[flag] = flags.pop(flags.index(flag) + 1)
            flags.remove(flag)
    argv = [x for pair in base.items() for x in pair] + ["--output_dir", str(tmp_path / "out"), *FAST, *flags]
    with pytest.raises(UserError, match=message) as err:
        trainer.main(argv)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_guards_other_architectures_and_existing_runs(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 1) == 0
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume auto"):
        train(image_folder, vqgan, out, "--max_steps", 2)
    with pytest.raises(UserError, match="different UNet \\(model_channels 64 here, 32 there\\)"):
        train(image_folder, vqgan, out, "--max_steps", 2, "--resume", "auto", "--model_channels", 64)
    with pytest.raises(UserError, match="not a trainer.py checkpoint"):
        train(image_folder, vqgan, tmp_path / "other", "--max_steps", 2, "--resume", out / "latent_cache")
    with pytest.raises(UserError, match="is not a latent cache"):  # never overwrite a folder that is not a cache
        train(image_folder, vqgan, tmp_path / "other", "--max_steps", 2, "--latent_cache", image_folder)
    assert checkpoints(out) == ["step_0000001"] and (image_folder / "metadata.jsonl").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--prediction_type", "v"], "--prediction_type epsilon there, v here"),
    (["--schedule", "cosine"], "--schedule scaled_linear there, cosine here"),
    (["--beta_end", "0.03"], "--beta_end 0.0195 there, 0.03 here"),
    (["--seed", "1"], "--seed 0 there, 1 here"),
    (["--batch_size", "2"], "--batch_size 4 there, 2 here"),
    (["--grad_accum", "2"], "--grad_accum 1 there, 2 here"),
    (["--min_snr_gamma", "0"], "--min_snr_gamma 5.0 there, 0.0 here"),
])
def test_resume_refuses_a_run_with_other_settings(tmp_path, image_folder, vqgan, flags, message):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 1) == 0
    with pytest.raises(UserError, match=f"belongs to another run \\({message}[;)].*: pass the same settings") as err:
        train(image_folder, vqgan, out, "--max_steps", 2, "--resume", "auto", *flags)
    assert "\n" not in str(err.value) and checkpoints(out) == ["step_0000001"]


def test_resume_allows_lr_and_intervals_and_checkpoints_without_an_identity(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 1, "--beta_start", "0.0015") == 0  # the default, given
    assert train(image_folder, vqgan, out, "--max_steps", 2, "--resume", "auto", "--lr", "5e-4", "--log_every", 2,
                 "--save_every", 2, "--keep_last", 4, "--ema_decay", "0.99", "--lr_schedule", "constant") == 0
    state = load_state_dir(out / "checkpoints" / "step_0000002")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-4, 5e-4]  # the new --lr took effect
    del state["identity"]  # as saved before checkpoints recorded their run's identity
    save_state_dir(out / "checkpoints" / "step_0000002", state)
    assert train(image_folder, vqgan, out, "--max_steps", 3, "--resume", "auto", "--seed", 5) == 0


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, image_folder, vqgan):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 2) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed half way through a log line
    assert train(image_folder, vqgan, out, "--max_steps", 3, "--resume", "auto") == 0
    assert [e["step"] for e in log_entries(out)] == [1, 2, 3]


def test_corrupt_newest_checkpoint_and_latent_cache_recover(tmp_path, image_folder, vqgan, capsys):
    out = tmp_path / "run"
    assert train(image_folder, vqgan, out, "--max_steps", 2, "--save_every", 1) == 0
    newest = out / "checkpoints" / "step_0000002" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (outside save_state_dir: a disk fault, a bad copy)
    cache = out / "latent_cache" / "tensors.safetensors"
    cache.write_bytes(cache.read_bytes()[:100])
    capsys.readouterr()
    assert train(image_folder, vqgan, out, "--max_steps", 3, "--save_every", 1, "--resume", "auto") == 0
    printed = capsys.readouterr().out
    assert "step_0000002 is a corrupt or truncated checkpoint" in printed and "at step 1" in printed
    assert "latent cache" in printed and "re-encoding" in printed
    assert [e["step"] for e in log_entries(out)] == [1, 2, 3]
    assert checkpoints(out) == ["step_0000001", "step_0000002", "step_0000003"]
    for name in checkpoints(out):
        assert load_state_dir(out / "checkpoints" / name)["step"] == int(name[5:])
    (out / "checkpoints" / "step_0000003" / "state.json").write_text("{")
    with pytest.raises(UserError, match="step_0000003 is a corrupt or truncated checkpoint"):  # named: one line
        train(image_folder, vqgan, out, "--max_steps", 4, "--resume", out / "checkpoints" / "step_0000003")


def test_command_line_bad_input_exits_2_with_one_line(tmp_path, image_folder):
    result = subprocess.run([sys.executable, "trainer.py", "--dataset_path", str(image_folder), "--vqgan_ckpt",
                             str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: VQGAN weights not found: {tmp_path / 'missing'}.safetensors"]


def test_precomputed_text_embeddings_train_without_the_encoder(tmp_path, image_folder, vqgan, monkeypatch):
    """text_encoder.py --save encodes a dataset's captions in advance; trainer.py --text_embeddings then trains and
    samples without loading the encoder, with embeddings equal to the encoder's own."""
    import text_encoder

    embeddings = tmp_path / "captions"
    assert text_encoder.main(["--save", str(embeddings), "--dataset_path", str(image_folder), "--caption_template",
                              "a {style} painting", "--max_length", "8", "an extra prompt"]) == 0
    precomputed = text_encoder.PrecomputedTextEncoder(embeddings)
    assert sorted(precomputed.index) == ["a Baroque painting", "a Expressionism painting", "a Impressionism painting",
                                         "an extra prompt"]
    context, mask = text_encoder.TextEncoder(max_length=8).encode(["a Baroque painting", "an extra prompt"])
    got_context, got_mask = precomputed.encode(["a Baroque painting", "an extra prompt"])
    assert torch.equal(got_context, context) and torch.equal(got_mask, mask)
    with pytest.raises(UserError, match="'a Rococo painting' is not in the text embeddings"):
        precomputed.encode(["a Rococo painting"])

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(text_encoder, "TextEncoder", no_encoder)
    out = tmp_path / "cond"
    flags = ["--max_steps", 2, "--conditional", "--caption_template", "a {style} painting", "--max_text_length", 8,
             "--sample_every", 2, "--num_samples", 2, "--sample_steps", 2, "--text_embeddings", embeddings]
    assert train(image_folder, vqgan, out, *flags) == 0
    cache = load_state_dir(out / "latent_cache")
    assert torch.equal(cache["context"][0].float(), context[0].half().float())
    assert json.loads((out / "unet.json").read_text())["text_encoder"] == trainer.DEFAULT_TEXT_ENCODER
    with pytest.raises(UserError, match="not --text_encoder .* at --max_text_length 16"):
        train(image_folder, vqgan, tmp_path / "other", *flags[:-4], "--max_text_length", 16, "--text_embeddings",
              embeddings)


def test_conditional_run_captions_an_unconditional_cache_without_encoding_the_images_again(
        tmp_path, image_folder, vqgan, capsys, monkeypatch):
    """The other order: an unconditional run's cache gains a conditional run's captions; its latents are kept."""
    cache = tmp_path / "cache"
    assert train(image_folder, vqgan, tmp_path / "uncond", "--max_steps", 0, "--latent_cache", cache) == 0
    latents = load_state_dir(cache)["latents"]
    assert "captions" not in load_state_dir(cache)

    def no_encoding(*_):
        raise AssertionError("the VQGAN encoder ran although an unconditional cache of the same images exists")

    monkeypatch.setattr(VQModel, "encode", no_encoding)
    assert train(image_folder, vqgan, tmp_path / "cond", "--max_steps", 1, "--conditional", "--caption_template",
                 "a {style} painting", "--max_text_length", 8, "--latent_cache", cache) == 0
    assert "added this run's captions to the 12 images" in capsys.readouterr().out
    captioned = load_state_dir(cache)
    assert torch.equal(captioned["latents"], latents)
    assert captioned["captions"] == ["a Baroque painting", "a Impressionism painting", "a Expressionism painting"]
    assert captioned["caption_ids"].tolist() == [0, 1, 2] * 4
    assert train(image_folder, vqgan, tmp_path / "cond2", "--max_steps", 1, "--conditional", "--caption_template",
                 "a {style} painting", "--max_text_length", 8, "--latent_cache", cache) == 0
    assert f"reusing {cache}" in capsys.readouterr().out  # now a conditional cache like any other


def test_unconditional_run_shares_a_conditional_cache_and_init_from_grows_it_a_conditional_model(
        tmp_path, image_folder, vqgan, capsys, monkeypatch):
    """The recipe of the bundled models: a conditional run's latent cache also serves the unconditional run, and
    the conditional model starts from the unconditional one (--init_from), computing the same at first."""
    cache = tmp_path / "cache"
    cond_flags = ["--conditional", "--caption_template", "a {style} painting", "--max_text_length", 8,
                  "--latent_cache", cache]
    assert train(image_folder, vqgan, tmp_path / "first", "--max_steps", 0, *cond_flags) == 0  # the cache alone
    output = capsys.readouterr().out
    assert "encoded 12 images" in output and "nothing trained" in output
    assert not (tmp_path / "first" / "checkpoints").exists() and not (tmp_path / "first" / "unet.json").exists()

    def no_encoding(*_):
        raise AssertionError("the VQGAN encoder ran although a conditional cache of the same images exists")

    monkeypatch.setattr(VQModel, "encode", no_encoding)
    assert train(image_folder, vqgan, tmp_path / "uncond", "--max_steps", 2, "--latent_cache", cache) == 0
    assert "this unconditional run uses its latents alone" in capsys.readouterr().out
    monkeypatch.undo()

    uncond = load_diffusion_model(tmp_path / "uncond" / "unet").unet
    cond = unet_training.make_unet("tiny", 4, 8, 384).eval()
    new, steps_before = unet_training.init_from_checkpoint(cond, tmp_path / "uncond" / "unet")
    assert steps_before == 2 and "null_context" in new
    assert all(re.search(r"null_context|\.norm2\.|\.cross_attn\.", k) for k in new)
    state = cond.state_dict()
    assert all(torch.equal(state[k], v) for k, v in uncond.state_dict().items())
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context, mask = torch.randn(2, 8, 384), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(cond(latents, t, context, mask), uncond(latents, t), atol=1e-6)

    diffusion.export_diffusion_model(tmp_path / "uncond" / "unet", tmp_path / "export")  # EMA alone, fp16
    from_export = unet_training.make_unet("tiny", 4, 8, 384).eval()
    unet_training.init_from_checkpoint(from_export, tmp_path / "export")
    assert all(torch.equal(from_export.state_dict()[k], v.half().float()) for k, v in uncond.state_dict().items())

    init = ["--init_from", tmp_path / "uncond" / "unet"]
    assert train(image_folder, vqgan, tmp_path / "cond", "--max_steps", 1, *cond_flags, *init) == 0
    assert f"initial weights from {tmp_path / 'uncond' / 'unet'}" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--init_from .* does not match the model \(wrong shape: .* != "):
        train(image_folder, vqgan, tmp_path / "wide", "--max_steps", 1, "--model_channels", 64, *cond_flags, *init)
    with pytest.raises(UserError, match=r"is not a Noise2Art diffusion checkpoint \(model: 'vqgan'\)"):
        train(image_folder, vqgan, tmp_path / "bad", "--max_steps", 1, "--init_from", vqgan)


def test_a_continued_model_averages_at_its_stated_decay_and_counts_its_total_steps(tmp_path, image_folder, vqgan,
                                                                                   monkeypatch):
    """A fresh run's EMA warms up; a run from --init_from averages at --ema_decay from its first step, on resume
    too, and its export counts the steps of both runs."""
    decays = []
    update_ema = training_loop.update_ema
    monkeypatch.setattr(unet_training, "update_ema", lambda ema, model, decay: decays.append(decay) or
                        update_ema(ema, model, decay))
    assert train(image_folder, vqgan, tmp_path / "fresh", "--max_steps", 3, "--ema_decay", 0.99) == 0
    assert decays == pytest.approx([0.1, 2 / 11, 3 / 12])
    decays.clear()
    continued = ["--init_from", tmp_path / "fresh" / "unet", "--ema_decay", 0.99, "--save_every", 2]
    assert train(image_folder, vqgan, tmp_path / "continued", "--max_steps", 2, *continued) == 0
    assert train(image_folder, vqgan, tmp_path / "continued", "--max_steps", 4, "--resume", "auto", *continued) == 0
    assert decays == [0.99] * 4
    config = json.loads((tmp_path / "continued" / "unet.json").read_text())
    assert config["training"]["step"] == 4 and config["training"]["total_steps"] == 7
    start = load_diffusion_model(tmp_path / "fresh" / "unet").unet.state_dict()
    run = load_diffusion_model(tmp_path / "continued" / "unet", use_ema=False).unet.state_dict()
    ema = load_diffusion_model(tmp_path / "continued" / "unet").unet.state_dict()
    name = next(k for k in ema if k.endswith("weight") and not torch.equal(start[k], run[k]))
    # four steps at 0.99 keep 0.99^4 of the starting weights: the EMA sits near the start, not at the last step
    assert (ema[name] - start[name]).norm() < 0.1 * (run[name] - start[name]).norm()


def test_pooled_text_embed_grows_from_a_conditional_model_and_older_runs_still_resume(
        tmp_path, image_folder, vqgan, capsys):
    cond_flags = ["--conditional", "--caption_template", "a {style} painting", "--max_text_length", 8,
                  "--latent_cache", tmp_path / "cache"]
    cond = tmp_path / "cond"
    assert train(image_folder, vqgan, cond, "--max_steps", 1, *cond_flags, "--no-pooled_text_embed") == 0
    newest = cond / "checkpoints" / "step_0000001"
    state = load_state_dir(newest)
    del state["config"]["unet"]["pooled_text_embed"]  # as saved before the option existed
    save_state_dir(newest, state)
    assert train(image_folder, vqgan, cond, "--max_steps", 2, *cond_flags, "--resume", "auto",
                 "--no-pooled_text_embed") == 0
    with pytest.raises(UserError, match=r"different UNet \(pooled_text_embed True here, False there\)"):
        train(image_folder, vqgan, cond, "--max_steps", 3, *cond_flags, "--resume", "auto", "--pooled_text_embed")
    capsys.readouterr()
    pooled = tmp_path / "pooled"
    assert train(image_folder, vqgan, pooled, "--max_steps", 1, *cond_flags, "--pooled_text_embed",
                 "--init_from", cond / "unet") == 0
    assert "2 new tensors (pooled_text_proj.weight, pooled_text_proj.bias)" in capsys.readouterr().out
    model = load_diffusion_model(pooled / "unet").unet
    assert model.config["pooled_text_embed"] and model.pooled_text_proj.weight.any()  # it trained
    with pytest.raises(UserError, match="--pooled_text_embed need --conditional"):
        train(image_folder, vqgan, tmp_path / "uncond", "--max_steps", 1, "--pooled_text_embed")


# ----------------------------------------------------------------------------------------------
# The training levers: focused timesteps and REPA, both off by default

REPA = ["--repa_weight", 0.5, "--repa_image_size", 128, "--repa_channels", 16]  # 4 x 4 targets of 16 channels


def test_default_training_runs_no_lever_and_resumes_along_its_own_trajectory(tmp_path, image_folder, vqgan,
                                                                            monkeypatch):
    """The default path never reaches the levers' code (REPA's targets, projector and loss, the focused timesteps'
    log-SNR draws: here they raise), and 3 steps + --resume + 3 steps retrace 6 straight steps, the same losses and
    weights bit for bit, so a default run resumes exactly (compared within this test, not against losses pinned
    from an older tree)."""
    def lever(*_, **__):
        raise AssertionError("a lever's code ran on the default path")

    for target in ("latent_cache.build_repa_cache", "trainer.make_projector", "unet_training.repa_loss",
                   "schedule.sample_log_snr"):
        monkeypatch.setattr(target, lever)
    flags = ["--max_steps", 6, "--save_every", 3, "--keep_last", 5]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(image_folder, vqgan, straight, *flags) == 0
    assert train(image_folder, vqgan, resumed, *flags, "--resume", straight / "checkpoints" / "step_0000003",
                 "--latent_cache", straight / "latent_cache") == 0
    assert [e["loss"] for e in log_entries(straight)[3:]] == [e["loss"] for e in log_entries(resumed)]
    a, b = (load_state_dir(out / "checkpoints" / "step_0000006") for out in (straight, resumed))
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])
    assert "repa_loss" not in log_entries(straight)[0] and not (tmp_path / "straight" / "latent_cache-repa").exists()
    assert "repa_projector" not in a


def test_channels_last_trains_as_the_plain_layout_and_resumes_in_either(tmp_path, image_folder, vqgan, monkeypatch):
    run = unet_training.build_training(unet_training.make_unet("small", 4, 8, None), torch.device("cpu"),
                                 NoiseSchedule(), 1e-4, lambda step: 1.0, channels_last=True)
    for unet in (run.unet, run.ema):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in unet.parameters() if p.dim() == 4)
    plain, out = tmp_path / "plain", tmp_path / "channels_last"
    assert train(image_folder, vqgan, plain, "--max_steps", 4) == 0
    layouts = []
    lerp = training_loop.update_ema

    def update_ema(ema, model, *rest):  # the EMA lerps into the training's layout, in-training sampling or not
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last)
                           for p in ema.parameters() if p.dim() == 4))
        return lerp(ema, model, *rest)

    monkeypatch.setattr(unet_training, "update_ema", update_ema)
    assert train(image_folder, vqgan, out, "--max_steps", 4, "--channels_last", "--sample_every", 2,
                 "--num_samples", 1, "--sample_steps", 2) == 0
    assert layouts == [True] * 4
    assert [e["loss"] for e in log_entries(out)] == pytest.approx([e["loss"] for e in log_entries(plain)], rel=1e-4)
    assert train(image_folder, vqgan, out, "--max_steps", 6, "--resume", "auto") == 0  # the layout may change
    assert checkpoints(out)[-1] == "step_0000006"


def test_focused_timesteps_train_at_fractional_timesteps_with_min_snr(tmp_path, image_folder, vqgan, monkeypatch):
    seen = []
    training_loss = NoiseSchedule.training_loss

    def spy(self, model_fn, x0, prediction_type, min_snr_gamma, t=None, noise=None):
        seen.append((t, min_snr_gamma))
        return training_loss(self, model_fn, x0, prediction_type, min_snr_gamma, t, noise)

    monkeypatch.setattr(NoiseSchedule, "training_loss", spy)
    out = tmp_path / "laplace"
    assert train(image_folder, vqgan, out, "--max_steps", 4, "--timestep_sampling", "laplace", "--timestep_loc", -1,
                 "--timestep_scale", 0.5, "--min_snr_gamma", 5) == 0
    t = torch.cat([t for t, _ in seen])
    assert len(seen) == 4 and all(gamma == 5 for _, gamma in seen) and not torch.equal(t, t.round())
    schedule = NoiseSchedule(**json.loads((out / "unet.json").read_text())["schedule"])  # the run's own
    log_snr = (schedule.alpha_bar(t) / (1 - schedule.alpha_bar(t))).log()
    assert (log_snr - -1).abs().max() < 4  # 16 draws of Laplace(-1, 0.5): uniform t would spread over [-10, 9]
    assert all(math.isfinite(e["loss"]) for e in log_entries(out))


def test_repa_cache_holds_lite2_targets_of_each_image_and_mirror_and_is_keyed_by_its_settings(
        tmp_path, image_folder, vqgan, capsys, monkeypatch):
    import features

    variants = []
    init = features.EfficientNetLiteFeatures.__init__

    def recording_init(self, variant=features.JUDGE):
        variants.append(variant)
        init(self, variant)

    monkeypatch.setattr(features.EfficientNetLiteFeatures, "__init__", recording_init)
    cache_path = tmp_path / "cache"

    def run(name, *flags):
        assert train(image_folder, vqgan, tmp_path / name, "--max_steps", 1, "--latent_cache", cache_path,
                     *flags) == 0
        return load_state_dir(tmp_path / "cache-repa"), capsys.readouterr().out

    repa, output = run("a", *REPA)
    assert "REPA cache: encoded 12 images" in output and variants == [features.TEACHER] == ["efficientnet-lite2"]
    assert repa["repa"].shape == (12, 2, 16, 4, 4) and repa["repa"].dtype == torch.float16
    assert repa["identity"]["teacher"] == "efficientnet-lite2" and 0 < repa["explained_variance"] < 1
    teacher = features.EfficientNetLiteFeatures(features.TEACHER)
    with Image.open(image_folder / "00000003.png") as img:
        image = image_to_tensor(img.convert("RGB"), 32)[None]
    with torch.no_grad():
        pair = torch.nn.functional.interpolate(torch.cat([image, image.flip(-1)]), size=(128, 128), mode="bilinear",
                                               antialias=True)
        maps = teacher.feature_maps(pair)[-1]  # 2 x 352 x 4 x 4: the image and its mirror image
    expected = latent_cache.project(maps, repa["pca_mean"], repa["pca_components"])
    assert torch.allclose(repa["repa"][3].float(), expected, atol=0.02 * expected.abs().max().item())
    assert not torch.allclose(repa["repa"][3, 0], repa["repa"][3, 1], atol=0.1)
    latent_key = load_state_dir(cache_path)["key"]

    def must_not_run(*_):
        raise AssertionError("an encoder ran although its cache is valid")

    monkeypatch.setattr(features.EfficientNetLiteFeatures, "feature_maps", must_not_run)
    monkeypatch.setattr(VQModel, "encode", must_not_run)
    _, output = run("b", *REPA)
    assert f"REPA cache: reusing {tmp_path / 'cache-repa'}" in output
    monkeypatch.undo()
    for flags, changed in ((["--repa_channels", 8], "channels"),
                           (["--repa_channels", 8, "--repa_image_size", 64], "image_size")):
        monkeypatch.setattr(VQModel, "encode", must_not_run)  # the latents do not depend on REPA's settings
        repa_before = repa["key"]
        repa, output = run("c" + changed, *REPA, *flags)
        assert f"REPA cache {tmp_path / 'cache-repa'} was built for another {changed}: re-encoding" in output
        assert repa["key"] != repa_before and load_state_dir(cache_path)["key"] == latent_key
        monkeypatch.undo()
    assert repa["repa"].shape == (12, 2, 8, 2, 2)


def test_repa_loss_falls_and_the_projector_stays_out_of_the_export(tmp_path, image_folder, vqgan):
    out = tmp_path / "repa"
    assert train(image_folder, vqgan, out, "--max_steps", 40, *REPA, "--repa_until", 36) == 0
    log = log_entries(out)
    repa = [e["repa_loss"] for e in log if "repa_loss" in e]
    assert len(repa) == 36 and all("repa_loss" not in e for e in log[36:])  # switched off after 36 steps
    first, last = sum(repa[:6]) / 6, sum(repa[-6:]) / 6
    assert -1 <= last < first - 0.2, (first, last)  # negative cosine: -1 is perfect alignment
    state = load_state_dir(out / "checkpoints" / "step_0000040")
    assert {k.split(".")[0] for k in state["repa_projector"]} == {"net"}
    tensors, config = diffusion.read_diffusion_model(out / "unet")
    unet_keys = set(state["model"])
    assert set(tensors) == {f"{part}.{k}" for part in ("model", "ema") for k in unet_keys}  # no projector
    exported = tmp_path / "export"
    diffusion.export_diffusion_model(out / "unet", exported)
    assert all(k.startswith("ema.") for k in diffusion.read_diffusion_model(exported)[0])
    pipeline = load_diffusion_model(exported, "cpu")
    assert not any("repa" in name or "projector" in name for name, _ in pipeline.unet.named_modules())
    assert config["training"]["args"]["repa_weight"] == 0.5


def test_resume_with_repa_is_exact_across_the_switch_off(tmp_path, image_folder, vqgan):
    """6 steps straight vs 3 + 3 with REPA switched off after step 4 and focused timesteps: the same UNet, EMA,
    projector and optimizer state, bit for bit; a REPA checkpoint cannot be resumed without REPA (run identity)."""
    flags = ["--max_steps", 6, "--save_every", 3, "--keep_last", 5, "--grad_accum", 2, *REPA, "--repa_until", 4,
             "--timestep_sampling", "logit-normal", "--min_snr_gamma", 5]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(image_folder, vqgan, straight, *flags) == 0
    assert train(image_folder, vqgan, resumed, *flags, "--resume", straight / "checkpoints" / "step_0000003",
                 "--latent_cache", straight / "latent_cache") == 0
    a = load_state_dir(straight / "checkpoints" / "step_0000006")
    b = load_state_dir(resumed / "checkpoints" / "step_0000006")
    for part in ("model", "ema", "repa_projector"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for index, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][index][k]) for k, v in moments.items())
    assert [e["loss"] for e in log_entries(straight)[3:]] == [e["loss"] for e in log_entries(resumed)]
    repa_losses = [[e.get("repa_loss") for e in log] for log in (log_entries(straight)[3:], log_entries(resumed))]
    assert repa_losses[0] == repa_losses[1] and repa_losses[0][0] is not None and repa_losses[0][-1] is None
    halfway = load_state_dir(straight / "checkpoints" / "step_0000003")["repa_projector"]
    assert not all(torch.equal(halfway[k], a["repa_projector"][k]) for k in halfway)  # the projector trained
    same_but_repa = ["--grad_accum", 2, "--timestep_sampling", "logit-normal", "--min_snr_gamma", 5]
    with pytest.raises(UserError, match=r"belongs to another run \(--repa_layer middle there, None here; "
                                        r"--repa_image_size 128 there, None here"):
        train(image_folder, vqgan, straight, "--max_steps", 8, "--resume", "auto", *same_but_repa)


def test_cache_batch_takes_the_repa_targets_and_embeddings_of_the_same_image_and_flip():
    code = torch.arange(12, dtype=torch.float16).reshape(6, 2)  # image i, flip f -> 2 i + f
    cache = {"latents": code[:, :, None, None, None].expand(6, 2, 4, 2, 2).clone(), "latent_scale": 1.0,
             "repa": code[:, :, None, None, None].expand(6, 2, 3, 2, 2).clone(),
             "image_embeds": torch.arange(6.0)[:, None].expand(6, 5).clone()}
    torch.manual_seed(0)
    latents, context, mask, targets, embeds = latent_cache.cache_batch(cache, torch.tensor([5, 0, 3, 3, 1]), "cpu")
    assert context is None and mask is None and targets.shape == (5, 3, 2, 2) and embeds.shape == (5, 5)
    assert torch.equal(latents[:, 0, 0, 0], targets[:, 0, 0, 0])  # the same image and the same flip
    assert embeds[:, 0].tolist() == [5, 0, 3, 3, 1]  # the painting's embedding, whichever flip
    codes = latents[:, 0, 0, 0].long()
    assert (codes // 2).tolist() == [5, 0, 3, 3, 1] and len(set((codes % 2).tolist())) == 2  # both flips drawn
    del cache["repa"], cache["image_embeds"]
    assert latent_cache.cache_batch(cache, torch.tensor([1]), "cpu")[3:] == (None, None)
