"""VQGAN: architecture matches the published checkpoints, save/load and conversion round-trip,
training, exact resume, safe loading and one-line errors. (The VQGAN evaluation is evaluate.py's: test_evaluate.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vqgan
import vqgan_losses
import vqgan_training
from checkpoints import list_checkpoints, load_state_dir, save_model, save_state_dir
from cli import UserError
from conftest import ROOT, sigterm_after_log_lines
from images import ImageSource, ImageTensorDataset, image_to_tensor
from metrics import code_statistics, psnr
from vqgan import CONFIGS, VQModel, load_vqgan, save_vqgan
from vqgan_losses import LPIPS, NLayerDiscriminator, load_lpips
from vqgan_training import load_init

# Spot checks of the published vq-f8 checkpoint layout (latent-diffusion first stage), written out by hand
# from the reference architecture rather than from our model.
PUBLISHED_VQ_F8_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.3.attn.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.conv_out.weight": (4, 512, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.up.3.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.2.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding.weight": (16384, 4),
    "quant_conv.weight": (4, 4, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
}
PUBLISHED_DISCRIMINATOR_SHAPES = {  # taming NLayerDiscriminator(n_layers=2), stored under loss.discriminator.
    "main.0.weight": (64, 3, 4, 4), "main.2.weight": (128, 64, 4, 4), "main.3.running_var": (128,),
    "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.8.weight": (1, 256, 4, 4), "main.8.bias": (1,),
}


def random_like(state_dict, generator):
    return {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in state_dict.items()}


def lightning_checkpoint(path, config_name, drop=None, reshape=None):
    """A checkpoint in the published layout: {"state_dict": autoencoder + loss.* entries, "global_step", ...}."""
    generator = torch.Generator().manual_seed(0)
    state_dict = random_like(VQModel(CONFIGS[config_name]).state_dict(), generator)
    disc = random_like(NLayerDiscriminator(n_layers=2).state_dict(), generator)
    state_dict.update({f"loss.discriminator.{k}": v for k, v in disc.items()})
    state_dict["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=generator)
    if drop:
        del state_dict[drop]
    if reshape:
        state_dict[reshape] = torch.zeros(7)
    torch.save({"state_dict": state_dict, "global_step": 123, "epoch": 4, "pytorch-lightning_version": "1.4.2"}, path)
    return state_dict


def train_args(data, out, *extra):
    return ["--config", "vq-f4-tiny", "--data", str(data), "--out", str(out), "--batch_size", "4", "--lr", "2e-3",
            "--log_every", "2", *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def newest_state(out):
    return load_state_dir(list_checkpoints(out / "checkpoints")[-1])


def test_tiny_config_is_small_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VQModel(CONFIGS["vq-f4-tiny"]).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.latent_scale = 0.5
    save_vqgan(model, tmp_path / "vq")
    loaded = load_vqgan(tmp_path / "vq", "cpu")
    assert loaded.latent_scale == 0.5 and loaded.config == model.config and not loaded.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images)
        assert latents.shape == (2, 4, 8, 8) and model.downsample_factor == 4
        # the weights round-trip exactly; load_vqgan's channels-last layout rounds the convolutions differently
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        assert torch.allclose(loaded.encode(images), latents, atol=1e-5)
        decoded = loaded.decode(latents)
        assert decoded.shape == images.shape and torch.allclose(decoded, model.decode(latents), atol=1e-5)


def test_load_vqgan_rejects_wrong_model_file(tmp_path):
    save_model(tmp_path / "unet", {"w": torch.zeros(1)}, {"model": "noise2art-unet"})
    with pytest.raises(UserError, match="not a VQGAN"):
        load_vqgan(tmp_path / "unet")


def test_bundled_vq_f4_small_reconstructs_paintings_through_4x32x32_latents(wikiart_mini):
    """The shipped vq-f4-small on 8 held-out 128 px paintings: 4x32x32 latents, and reconstructions that beat the
    paintings area-downsampled to the latents' 32x32 grid and upsampled back (mean PSNR 27.5 vs 24.4 dB), each
    nearest its own painting. Random weights, or a decoder that ignores its latents or mixes its colour channels,
    fail."""
    model = load_vqgan(ROOT / "models" / "vqgan")
    assert {k: model.config[k] for k in CONFIGS["vq-f4-small"]} == CONFIGS["vq-f4-small"]
    source = ImageSource(wikiart_mini, "test")
    images = torch.stack([image_to_tensor(source.image(row), 128) for row in range(8)])
    with torch.no_grad():
        latents = model.encode(images)
        reconstructions = model.decode(latents)
    assert latents.shape == (8, 4, 32, 32) and reconstructions.shape == images.shape
    blurred = F.interpolate(F.interpolate(images, scale_factor=0.25, mode="area"), scale_factor=4, mode="bilinear")
    assert psnr(reconstructions, images).mean() > psnr(blurred, images).mean() + 1.5
    pairs = torch.stack([psnr(reconstructions, images.roll(shift, 0)) for shift in range(8)])  # 8 shifts x 8 images
    assert torch.equal(pairs.argmax(0), torch.zeros(8, dtype=torch.long))  # shift 0: its own painting


def test_published_vq_f8_checkpoint_converts_bit_exactly_and_encodes_256px_to_4x32x32(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    published = lightning_checkpoint(ckpt, "vq-f8")
    for key, shape in PUBLISHED_VQ_F8_SHAPES.items():
        assert tuple(published[key].shape) == shape, key
    for key, shape in PUBLISHED_DISCRIMINATOR_SHAPES.items():
        assert tuple(published[f"loss.discriminator.{key}"].shape) == shape, key

    argv = ["--config", "vq-f8", "--init_ckpt", str(ckpt), "--max_steps", "0", "--out", str(tmp_path / "f8")]
    assert vqgan.main(argv) == 0
    exported = load_file(str(tmp_path / "f8" / "vqgan.safetensors"))
    assert set(exported) == {k for k in published if not k.startswith("loss.")}
    assert all(torch.equal(exported[k], published[k]) for k in exported)
    config = json.loads((tmp_path / "f8" / "vqgan.json").read_text())
    assert config["model"] == "vqgan" and config["n_embed"] == 16384 and config["latent_scale"] == 1.0

    model = load_vqgan(tmp_path / "f8" / "vqgan")
    assert model.downsample_factor == 8
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 256, 256)).shape == (1, 4, 32, 32)


@pytest.mark.parametrize("problem", ["drop", "reshape"])
def test_mismatched_checkpoint_is_an_error_naming_the_key(tmp_path, problem):
    ckpt = tmp_path / "model.ckpt"
    key = "decoder.up.1.block.0.conv1.weight"
    lightning_checkpoint(ckpt, "vq-f4-tiny", **{problem: key})
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        vqgan.main(["--config", "vq-f4-tiny", "--init_ckpt", str(ckpt), "--max_steps", "0", "--out",
                    str(tmp_path / "o")])
    assert not (tmp_path / "o" / "vqgan.safetensors").exists()


def test_published_discriminator_is_mapped_when_shapes_match(tmp_path):
    published = lightning_checkpoint(tmp_path / "model.ckpt", "vq-f4-tiny")
    model, disc = VQModel(CONFIGS["vq-f4-tiny"]), NLayerDiscriminator(n_layers=2)
    assert load_init(model, disc, published, "model.ckpt")
    assert torch.equal(disc.state_dict()["main.5.weight"], published["loss.discriminator.main.5.weight"])
    assert torch.equal(model.state_dict()["quantize.embedding.weight"], published["quantize.embedding.weight"])
    deeper = NLayerDiscriminator(n_layers=3)
    before = deeper.state_dict()["main.0.weight"].clone()
    assert not load_init(model, deeper, published, "model.ckpt")
    assert torch.equal(deeper.state_dict()["main.0.weight"], before)


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, image_folder):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": Payload()}}, evil)
    for flag in ("--init_ckpt", "--perceptual_weights"):
        argv = ["--config", "vq-f4-tiny", flag, str(evil), "--max_steps", "0", "--out", str(tmp_path / "o")]
        if flag == "--perceptual_weights":
            argv = train_args(image_folder, tmp_path / "o", "--perceptual", "lpips-vgg", flag, str(evil))
        with pytest.raises(UserError, match="--trust_checkpoint"):
            vqgan.main(argv)
    assert not marker.exists()


def test_lpips_needs_weights_and_loads_them_from_a_published_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if the optional package were absent
    with pytest.raises(UserError, match="--perceptual effnet"):
        load_lpips(None, {}, False)
    weights = random_like(LPIPS().state_dict(), torch.Generator().manual_seed(1))
    weights = {k: v.abs() if k.startswith("lin") else v for k, v in weights.items()}  # LPIPS linear weights are >= 0
    ckpt = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {f"loss.perceptual_loss.{k}": v for k, v in weights.items()}}, ckpt)
    lpips = load_lpips(str(ckpt), {}, False)
    assert torch.equal(lpips.net.slice3.state_dict()["10.weight"], weights["net.slice3.10.weight"])
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert lpips(a, a).abs().max() < 1e-6 and (lpips(a, b) > 0).all()


def test_training_loss_falls_skips_unreadable_images_and_psnr_rises(tmp_path, image_folder):
    (image_folder / "broken.png").write_bytes(b"not a png")
    with open(image_folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "style": "Baroque"}) + "\n")
    out = tmp_path / "run"
    assert vqgan.main(train_args(image_folder, out, "--max_steps", "100", "--perceptual", "none", "--ckpt_every", "100",
                                 "--log_every", "20", "--disc_start", "80")) == 0
    log = read_log(out)
    assert [entry["step"] for entry in log] == [20, 40, 60, 80, 100]
    assert min(log[-2]["l1"], log[-1]["l1"]) < 0.92 * log[0]["l1"]
    assert sum(entry["skipped_images"] for entry in log) > 0
    assert "d_loss" in log[-1] and "d_loss" not in log[-2]
    assert 0 < log[-1]["code_usage"] <= 1 and log[-1]["perplexity"] > 1
    assert (out / "samples" / "step_0000100.png").is_file()
    model = load_vqgan(out / "vqgan")
    assert model.latent_scale != 1.0 and model.latent_scale > 0

    dataset = ImageTensorDataset(ImageSource(image_folder), 32, random_crop=False, flip=False)
    images = torch.stack([image for image in dataset if image is not None])  # the 12 readable ones

    def mean_psnr(model):
        with torch.no_grad():
            return psnr(model(images)[0].clamp(-1, 1), images).mean().item()

    torch.manual_seed(0)  # the initialisation training started from (same seed)
    assert mean_psnr(model) > mean_psnr(VQModel(CONFIGS["vq-f4-tiny"]).eval()) + 1.0


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, image_folder):
    common = ["--max_steps", "6", "--ckpt_every", "3", "--perceptual", "effnet", "--disc_start", "2",
              "--scale_images", "8"]
    assert vqgan.main(train_args(image_folder, tmp_path / "a", *common)) == 0
    assert vqgan.main(train_args(image_folder, tmp_path / "b", *common[2:], "--max_steps", "3")) == 0
    assert newest_state(tmp_path / "b")["step"] == 3
    with pytest.raises(UserError, match="--resume auto"):  # an existing run is never silently overwritten
        vqgan.main(train_args(image_folder, tmp_path / "b", *common))
    assert vqgan.main(train_args(image_folder, tmp_path / "b", *common, "--resume", "auto")) == 0

    state_a, state_b = newest_state(tmp_path / "a"), newest_state(tmp_path / "b")
    assert state_a["step"] == state_b["step"] == 6
    for part in ("model", "disc"):
        assert all(torch.equal(state_a[part][k], state_b[part][k]) for k in state_a[part]), part
    assert torch.equal(state_a["opt_ae"]["state"][0]["exp_avg"], state_b["opt_ae"]["state"][0]["exp_avg"])
    assert [e["step"] for e in read_log(tmp_path / "b")] == [2, 3, 4, 6]  # lines after step 3 were not duplicated
    exported_a, exported_b = (load_file(str(tmp_path / run / "vqgan.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)
    # resuming with another --lr continues at that rate
    assert vqgan.main(train_args(image_folder, tmp_path / "b", *common[2:], "--max_steps", "7", "--resume", "auto",
                                 "--lr", "1e-4")) == 0
    state = newest_state(tmp_path / "b")
    groups = state["opt_ae"]["param_groups"] + state["opt_disc"]["param_groups"]
    assert state["step"] == 7 and {g["lr"] for g in groups} == {1e-4}


def test_sigterm_saves_state_and_export_and_resume_auto_continues(tmp_path, image_folder):
    out = tmp_path / "run"
    returncode, stdout, stderr = sigterm_after_log_lines(
        ["vqgan.py", *train_args(image_folder, out, "--max_steps", "100000", "--log_every", "1", "--perceptual", "none",
                                 "--scale_images", "4")], out / "log.jsonl", 2)
    assert returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout + stderr
    step = newest_state(out)["step"]
    assert step >= 2 and read_log(out)[-1]["step"] == step
    assert load_vqgan(out / "vqgan").latent_scale > 0
    assert vqgan.main(train_args(image_folder, out, "--max_steps", str(step + 2), "--log_every", "1", "--perceptual",
                                 "none", "--scale_images", "4", "--resume", "auto")) == 0
    assert [e["step"] for e in read_log(out)] == list(range(1, step + 3))


FAST_TRAIN = ["--perceptual", "none", "--scale_images", "4", "--log_every", "1", "--ckpt_every", "1"]


def test_resume_refuses_other_settings_and_accepts_states_without_an_identity(tmp_path, image_folder):
    out = tmp_path / "run"
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "1")) == 0
    for flags, message in [(["--seed", "1"], "--seed 0 there, 1 here"),
                           (["--batch_size", "2"], "--batch_size 4 there, 2 here"),
                           (["--ch", "64"], "--ch 32 there, 64 here"),
                           (["--disc_start", "5"], "--disc_start None there, 5 here")]:  # None: never
        with pytest.raises(UserError, match=f"belongs to another run \\({message}\\)"):
            vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "2", "--resume", "auto", *flags))
    state = newest_state(out)
    del state["identity"]  # a state saved before states recorded their run's identity
    save_state_dir(list_checkpoints(out / "checkpoints")[-1], state)
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "2", "--resume", "auto",
                                 "--seed", "1")) == 0
    assert newest_state(out)["step"] == 2


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, image_folder):
    out = tmp_path / "run"
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "2")) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "l1": 0.')  # killed half way through a log line
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "3", "--resume", "auto")) == 0
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "2")) == 0
    (out / "checkpoints" / "step_0000002" / "state.json").write_text('{"__dict__": [[')  # truncated
    capsys.readouterr()
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "3", "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "step_0000002 is a corrupt or truncated checkpoint" in printed and "at step 1" in printed
    assert [e["step"] for e in read_log(out)] == [1, 2, 3] and newest_state(out)["step"] == 3


class Killed(BaseException):
    """A kill -9 at one exact moment."""


def test_a_kill_while_a_checkpoint_is_swapped_in_keeps_the_previous_one(tmp_path, image_folder, monkeypatch, capsys):
    """The rename that puts the second checkpoint in place never happens: the first must still be there."""
    import checkpoints

    real_replace, folders_moved_in = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp") and os.path.isdir(src):  # save_state_dir's finished folder moving in
            folders_moved_in.append(dst)
            if len(folders_moved_in) == 2:
                raise Killed
        return real_replace(src, dst)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    with pytest.raises(Killed):
        vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "3"))
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    capsys.readouterr()
    assert vqgan.main(train_args(image_folder, out, *FAST_TRAIN, "--max_steps", "3", "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out  # not a fresh start from step 0
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]


def test_dead_codes_restart_from_encoder_outputs():
    codebook = torch.zeros(6, 4)
    last_used = torch.tensor([10, 10, 0, 0, 9, 3])
    latents = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2) + 1
    assert vqgan_training.restart_dead_codes(codebook, last_used, latents, step=10, patience=5) == 3
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    for code in (2, 3, 5):
        assert any(torch.equal(codebook[code], v) for v in vectors) and last_used[code] == 10
    assert codebook[[0, 1, 4]].abs().sum() == 0
    usage, perplexity = code_statistics(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)


def test_batch_plan_is_a_function_of_the_step():
    full = list(vqgan_training.batch_plan(10, 4, seed=3, start_step=0, end_step=6))
    assert list(vqgan_training.batch_plan(10, 4, seed=3, start_step=4, end_step=6)) == full[4:]
    first_epoch = [index for batch in full[:5] for index, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize("argv, message", [
    (["--config", "vq-f99", "--out", "o", "--data", "d"], "unknown --config"),
    (["--config", "vq-f4-tiny", "--out", "o", "--batch_size", "0"], "argument --batch_size: must be at least 1"),
    (["--max_steps", "0", "--out", "o"], "needs --init_ckpt"),
    (["--config", "vq-f4-tiny", "--resolution", "30", "--out", "o", "--data", "d"], "not a multiple"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        vqgan.main(argv)


def test_cli_exits_2_with_one_line_on_missing_data(tmp_path):
    result = subprocess.run([sys.executable, str(vqgan.__file__), "--config", "vq-f4-tiny", "--data",
                             str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--perceptual", "none"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")


def resaved(folder, path, weight=None):
    """folder's exported VQGAN saved again at `path`, with `weight` (a function of the model) nudged first."""
    model = load_vqgan(folder / "vqgan")
    if weight is not None:
        with torch.no_grad():
            weight(model)[0, 0, 0, 0] += 0.5
    save_vqgan(model, path)
    return path


def test_finetune_decoder_keeps_latents_and_codes_bit_for_bit(image_folder, tmp_path):
    """--finetune_decoder trains post_quant_conv + decoder with the GAN on (after a discriminator warm-up) and
    leaves encode(), the quantiser, the codebook and the latent scale exactly as they were."""
    base = tmp_path / "base"
    assert vqgan.main(train_args(image_folder, base, "--max_steps", "2", "--perceptual", "none")) == 0
    before = load_vqgan(base / "vqgan")
    tuned = tmp_path / "tuned"
    args = train_args(image_folder, tuned, "--max_steps", "4", "--perceptual", "none", "--finetune_decoder",
                      "--init_ckpt", str(base / "vqgan.safetensors"), "--disc_start", "0", "--disc_warmup", "2")
    assert vqgan.main(args) == 0
    after = load_vqgan(tuned / "vqgan")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents_before, latents_after = before.encode(images), after.encode(images)
    assert torch.equal(latents_before, latents_after)
    z_q_before, _, codes_before = before.quantize(latents_before)
    z_q_after, _, codes_after = after.quantize(latents_after)
    assert torch.equal(codes_before, codes_after) and torch.equal(z_q_before, z_q_after)
    assert after.latent_scale == before.latent_scale
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    assert not torch.equal(before.post_quant_conv.weight, after.post_quant_conv.weight)
    # latents_digest, which keys latent caches and UNet runs, sees the encoder side only
    assert vqgan.latents_digest(tuned / "vqgan") == vqgan.latents_digest(base / "vqgan.json")
    digest = vqgan.latents_digest(resaved(tuned, tmp_path / "same"))
    assert vqgan.latents_digest(resaved(tuned, tmp_path / "dec", lambda m: m.decoder.conv_out.weight)) == digest
    assert vqgan.latents_digest(resaved(tuned, tmp_path / "enc", lambda m: m.encoder.conv_in.weight)) != digest
    log = read_log(tuned)
    assert "d_loss" in log[0] and "g_loss" not in log[0]  # steps 0-1: the discriminator trains alone
    assert "g_loss" in log[1]
    plain = [a for a in args if a != "--finetune_decoder"]  # a resume keeps the flag, or is refused
    with pytest.raises(UserError, match="--finetune_decoder True there, False here"):
        vqgan.main([*plain, "--max_steps", "5", "--resume", "auto"])


def test_r1_penalty_is_the_squared_input_gradient_and_trains_the_discriminator():
    disc = torch.nn.Conv2d(3, 1, 1)  # D(x) at each position = w . x + b, so grad_x sum(D) = w at every pixel
    images = torch.randn(2, 3, 4, 5)
    logits, penalty = vqgan_losses.r1_penalty(disc, images)
    w = disc.weight.detach().flatten()
    assert torch.equal(logits, disc(images)) and not images.requires_grad
    assert torch.allclose(penalty, 4 * 5 * w.square().sum())
    penalty.backward()  # d/dw of H W |w|^2
    assert torch.allclose(disc.weight.grad.flatten(), 2 * 4 * 5 * w)


def test_disc_r1_enters_the_discriminator_update_only():
    """The same step with and without the penalty: the autoencoder moves identically, the discriminator does not."""
    import copy

    torch.manual_seed(0)
    model, disc = VQModel(CONFIGS["vq-f4-tiny"]), NLayerDiscriminator(n_layers=2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    results = {}
    for gamma in (0.0, 10.0):
        m, d = copy.deepcopy(model), copy.deepcopy(disc)
        opt_ae, opt_disc = torch.optim.Adam(m.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)
        weights = vqgan_losses.LossWeights(perceptual=0.0, disc_start=0, disc_warmup=1, disc_r1=gamma)
        metrics, _, _ = vqgan_training.train_step(m, d, None, opt_ae, opt_disc, images, 0, weights, "cpu")
        results[gamma] = (m, d, metrics)
    (m0, d0, metrics0), (m1, d1, metrics1) = results[0.0], results[10.0]
    assert "r1" not in metrics0 and metrics1["r1"] > 0 and metrics0["d_loss"] == pytest.approx(metrics1["d_loss"])
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0.parameters(), d1.parameters()))


def test_disc_r1_is_logged_and_part_of_the_run(image_folder, tmp_path):
    args = train_args(image_folder, tmp_path / "run", "--max_steps", "2", "--perceptual", "none", "--disc_start",
                      "0", "--disc_r1", "0.5", "--log_every", "1")
    assert vqgan.main(args) == 0
    assert all(entry["r1"] > 0 for entry in read_log(tmp_path / "run"))
    with pytest.raises(UserError, match="--disc_r1 0.5 there, 0.0 here"):
        vqgan.main([*args[:args.index("--disc_r1")], *args[args.index("--disc_r1") + 2:], "--max_steps", "3",
                    "--resume", "auto"])


def test_finetune_decoder_needs_init_ckpt(image_folder, tmp_path):
    with pytest.raises(UserError, match="--finetune_decoder needs --init_ckpt"):
        vqgan.main(train_args(image_folder, tmp_path / "x", "--finetune_decoder"))


# The recipes of the shipped models/vqgan (docs/models.md, docs/decoder-finetune.md), written out here rather than
# read from vqgan.RECIPES, so that a changed default fails.
FIRST_STAGE = dict(config="vq-f4-small", resolution=None, batch_size=8, perceptual="effnet", perceptual_weight=0.1,
                   max_steps=2427, lr=4e-4, lr_drop_step=1653, lr_drop_factor=0.25, disc_start=None,
                   dead_code_steps=20, scale_images=256, export_dtype="fp16", bf16=None, seed=0)
DECODER_FINETUNE = dict(batch_size=8, perceptual="effnet", perceptual_weight=0.1, max_steps=300, lr=5e-5,
                        lr_drop_step=None, disc_start=0, disc_warmup=50, disc_weight=0.3, disc_r1=1e-5,
                        export_dtype="fp16", bf16=None)


@pytest.mark.parametrize("flags, recipe", [([], FIRST_STAGE),
                                           (["--finetune_decoder", "--init_ckpt", "models/vqgan"], DECODER_FINETUNE)])
def test_data_and_out_alone_give_the_shipped_recipe_of_each_stage(flags, recipe):
    args = vqgan.parse_args(["--data", "D", "--out", "O", *flags])
    assert {name: getattr(args, name) for name in recipe} == recipe  # bf16 None: on where it pays, found at run time
    if not args.finetune_decoder:  # 128 px; 4e-4 to step 1,652, 1e-4 from step 1,653 (where the run was resumed)
        assert CONFIGS[args.config]["resolution"] == 128
        assert [vqgan_training.learning_rate(step, args.lr, args.lr_drop_step, args.lr_drop_factor)
                for step in (0, 1652, 1653, 2426)] == [4e-4, 4e-4, 1e-4, 1e-4]


def test_given_flags_override_the_recipe_and_help_names_each_stages_default(capsys):
    args = vqgan.parse_args(["--data", "D", "--out", "O", "--finetune_decoder", "--init_ckpt", "v", "--lr", "1e-3",
                             "--disc_start", "never", "--lr_drop_step", "7"])
    assert (args.lr, args.disc_start, args.lr_drop_step, args.disc_r1) == (1e-3, None, 7, 1e-5)
    assert vqgan.parse_args(["--init_ckpt", "v", "--max_steps", "0", "--out", "O"]).export_dtype == "fp32"
    with pytest.raises(SystemExit):
        vqgan.parse_args(["-h"])
    shown = " ".join(capsys.readouterr().out.split())
    for expected in ("default: 2427 (first stage), 300 (--finetune_decoder)",
                     "default: 0.0004 (first stage), 5e-05 (--finetune_decoder)",
                     "default: never (first stage), 0 (--finetune_decoder)",
                     "default: 0 (first stage), 1e-05 (--finetune_decoder)"):
        assert expected in shown


def test_each_export_records_how_it_was_trained(image_folder, tmp_path):
    """The recipe defaults a run resolved (bf16 included) and its step land in vqgan.json; VQGANs saved before
    exports recorded it (models/vqgan.json) still load, and the record leaves latents_digest alone."""
    from pathlib import Path

    from devices import native_bf16, pick_device

    fast = ["--config", "vq-f4-tiny", "--perceptual", "none", "--scale_images", "4", "--max_steps", "2"]
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert vqgan.main(["--data", str(image_folder), "--out", str(base), *fast]) == 0
    assert vqgan.main(["--data", str(image_folder), "--out", str(tuned), *fast[2:], "--finetune_decoder",
                       "--init_ckpt", str(base / "vqgan")]) == 0
    bf16 = native_bf16(pick_device("auto"))
    for out, recipe in ((base, FIRST_STAGE), (tuned, DECODER_FINETUNE)):
        training = json.loads((out / "vqgan.json").read_text())["training"]
        expected = {**recipe, "max_steps": 2, "bf16": bf16, "config": "vq-f4-tiny", "perceptual": "none",
                    "perceptual_weight": 1.0, "scale_images": 4}
        assert training["step"] == 2
        assert {name: training["args"][name] for name in recipe} == {name: expected[name] for name in recipe}
        assert all(t.dtype == torch.float16 for t in load_file(str(out / "vqgan.safetensors")).values())
        assert "training" not in load_vqgan(out / "vqgan").config  # the record is no part of the architecture
    shipped = Path(vqgan.__file__).parent / "models" / "vqgan"
    assert "training" not in json.loads(shipped.with_suffix(".json").read_text())
    assert load_vqgan(shipped).config["n_embed"] == 2048
    model = load_vqgan(base / "vqgan")
    save_vqgan(model, tmp_path / "plain")
    save_vqgan(model, tmp_path / "recorded", training={"step": 5, "args": {"lr": 1.0}})
    assert vqgan.latents_digest(tmp_path / "plain") == vqgan.latents_digest(tmp_path / "recorded")


def test_the_learning_rate_drops_at_lr_drop_step_in_training_and_on_resume(image_folder, tmp_path):
    out = tmp_path / "run"
    flags = [*FAST_TRAIN, "--lr_drop_step", "2", "--lr_drop_factor", "0.5"]
    for steps in (2, 3):  # a run to step 2 (steps 0-1 at --lr), resumed to step 3 (step 2 at half of it)
        assert vqgan.main(train_args(image_folder, out, *flags, "--max_steps", str(steps),
                                     *(["--resume", "auto"] if steps == 3 else []))) == 0
        state = newest_state(out)
        groups = state["opt_ae"]["param_groups"] + state["opt_disc"]["param_groups"]
        assert {g["lr"] for g in groups} == {2e-3 if steps == 2 else 1e-3}
