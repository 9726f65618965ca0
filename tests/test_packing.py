"""packing.py and training on a rented GPU machine (experiments/gpu_pack.sh, train_gpu.sh, gpu_unpack.sh): codes
round-trip bit-exactly and decode as the cache's latents do, trainer.py trains on a pack without `datasets`, parts
split and join bit-exactly, a corrupted part is refused, the travelling size is what would be sent, shelving leaves
the shipped UNets behind and restores them, and the smoke path runs end to end."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_image_folder

import diffusion
import latent_cache
import packing
import trainer
from checkpoints import load_state_dir
from cli import UserError
from diffusion import load_diffusion_model
from vqgan import CONFIGS, VQModel, load_vqgan, save_vqgan

FAST = ["--unet_size", "tiny", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--no-bf16",
        "--warmup_steps", "0", "--sample_every", "0", "--log_every", "1"]
COND = ["--conditional", "--caption_template", "a {style} painting", "--max_text_length", "8"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(VQGAN, conditional latent cache of 12 paintings as trainer.py builds it), made once for these tests. The
    VQGAN is vq-f4-tiny with 300 codes (9-bit codes, so they straddle bytes), spread like its latents."""
    folder = tmp_path_factory.mktemp("made")
    images = write_image_folder(folder / "images", ["Baroque", "Symbolism"])
    torch.manual_seed(0)
    model = VQModel({**CONFIGS["vq-f4-tiny"], "n_embed": 300})
    model.quantize.embedding.weight.data.normal_(0, 0.3)
    save_vqgan(model, folder / "vqgan")
    assert trainer.main(["--dataset_path", str(images), "--vqgan_ckpt", str(folder / "vqgan"), "--output_dir",
                         str(folder / "first"), "--max_steps", "0", "--latent_cache", str(folder / "cache"),
                         *FAST, *COND]) == 0
    return folder / "vqgan", folder / "cache"


# ----------------------------------------------------------------------------------------------
# Codes


@pytest.mark.parametrize("bits", [1, 9, 11, 16])
def test_bit_packing_round_trip_is_exact_across_chunks(bits):
    values = torch.randint(0, 2 ** bits, (packing.CHUNK + 13,))
    values[:2] = torch.tensor([0, 2 ** bits - 1])
    packed = packing.pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and len(packed) == -(-len(values) * bits // 8)
    assert torch.equal(packing.unpack_bits(packed, bits, len(values)), values)


def test_packed_cache_holds_the_quantised_latents_which_decode_as_the_cache_does(made, tmp_path):
    vqgan, cache = made
    model, latents = load_vqgan(vqgan), load_state_dir(cache)
    packing.main(["latents", "--latent_cache", str(cache), "--vqgan_ckpt", str(vqgan), "--out", str(tmp_path / "p")])
    packed = load_state_dir(tmp_path / "p")
    assert packed["code_bits"] == 9 and packed["codes_shape"] == [12, 2, 8, 8] and len(packed["codes"]) == 12 * 2 * 72
    unpacked = packing.read_packed_latents(tmp_path / "p", model)
    z = latents["latents"].flatten(0, 1).float()  # 24 x 4 x 8 x 8: each image and its mirror image
    _, _, codes = model.quantize(z)  # 24 x 8 x 8
    z_q = packing.codebook_of(model)[codes].permute(0, 3, 1, 2)
    assert torch.equal(unpacked["latents"].flatten(0, 1), z_q)
    with torch.no_grad():  # the same codes, so the same images (the straight-through z + (z_q - z) rounds z_q)
        assert torch.allclose(model.decode(z_q), model.decode(z), atol=1e-5)
    for key in ("captions", "caption_ids", "context", "context_mask", "latent_scale", "identity"):
        assert unpacked[key] == latents[key] if not torch.is_tensor(latents[key]) else torch.equal(unpacked[key],
                                                                                                  latents[key])
    error = packed["quantisation_error"]
    assert error["rms_error_scaled"] == pytest.approx(error["rms_error"] * latents["latent_scale"])
    assert 0 < error["relative"] < 1 and error["rms_error"] == pytest.approx((z - z_q).pow(2).mean().sqrt(), 1e-4)
    torch.manual_seed(1)
    with pytest.raises(UserError, match="another VQGAN codebook"):
        packing.read_packed_latents(tmp_path / "p", VQModel({**CONFIGS["vq-f4-tiny"], "n_embed": 300}))
    with pytest.raises(UserError, match="is not packed latents"):
        packing.read_packed_latents(cache, model)


def test_trainer_trains_on_packed_latents_without_datasets(made, tmp_path, monkeypatch):
    """The GPU-machine path: --packed_latents and --text_embeddings, with `import datasets` failing; the batches are the
    quantised latents, and a conditional and an unconditional run both train from the one pack."""
    vqgan, cache = made
    import text_encoder

    text_encoder.main(["--save", str(tmp_path / "captions"), "--max_length", "8", *load_state_dir(cache)["captions"]])
    packing.main(["latents", "--latent_cache", str(cache), "--vqgan_ckpt", str(vqgan), "--out", str(tmp_path / "p")])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    base = ["--packed_latents", str(tmp_path / "p"), "--vqgan_ckpt", str(vqgan), "--max_steps", "2", *FAST]
    assert trainer.main([*base, "--output_dir", str(tmp_path / "uncond")]) == 0
    assert trainer.main([*base, "--output_dir", str(tmp_path / "cond"), *COND, "--text_embeddings",
                         str(tmp_path / "captions"), "--init_from", str(tmp_path / "uncond" / "unet")]) == 0
    pipeline = load_diffusion_model(tmp_path / "cond" / "unet")
    assert pipeline.config["text_encoder"] == trainer.DEFAULT_TEXT_ENCODER and pipeline.config["training"]["step"] == 2
    args = trainer.parse_args([*base, *COND])
    model = load_vqgan(vqgan)
    got = latent_cache.packed_cache(args.packed_latents, model, 32, trainer.caption_settings(args))
    _, _, codes = model.quantize(load_state_dir(cache)["latents"].flatten(0, 1).float())
    z_q = packing.codebook_of(model)[codes].permute(0, 3, 1, 2)
    assert torch.equal(got["latents"].flatten(0, 1), z_q) and got["captions"] == load_state_dir(cache)["captions"]
    assert "context" not in latent_cache.packed_cache(args.packed_latents, model, 32)
    other = trainer.caption_settings(trainer.parse_args([*base, *COND[:-2], "--max_text_length", "16"]))
    with pytest.raises(UserError, match="holds captions .* not this run's"):
        latent_cache.packed_cache(args.packed_latents, model, 32, other)
    with pytest.raises(UserError, match="holds 32 px images, this run trains at --resolution 64"):
        latent_cache.packed_cache(args.packed_latents, model, 64, trainer.caption_settings(args))
    with pytest.raises(UserError, match="exactly one of --dataset_path and --packed_latents"):
        trainer.main([*base, "--dataset_path", str(tmp_path), "--output_dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------------------------
# Parts


def test_split_and_join_round_trip_is_bit_exact(tmp_path):
    files = {"a.safetensors": os.urandom(2500), "a.json": b'{"x": 1}', "b.safetensors": os.urandom(999)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out, dest = tmp_path / "out", tmp_path / "dest"
    parts = packing.split_files([tmp_path / "a.safetensors", tmp_path / "a.json"], "a", out, part_bytes=1000)
    assert [p.name for p in parts] == ["a.part00", "a.part01", "a.part02"] and parts[0].stat().st_size == 1000
    packing.split_files([tmp_path / "b.safetensors"], "b", out, part_bytes=1000)
    assert sorted(json.loads((out / "manifest.json").read_text())["stages"]) == ["a", "b"]
    written = packing.join_files(out, dest)
    assert sorted(p.name for p in written) == sorted(files)
    assert all((dest / name).read_bytes() == data for name, data in files.items())
    with pytest.raises(UserError, match="would hold 10 files, more than the 8"):
        packing.split_files([tmp_path / "b.safetensors"], "c", out, part_bytes=200)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_or_missing_part_is_refused_and_nothing_is_installed(tmp_path, damage):
    (tmp_path / "m.safetensors").write_bytes(os.urandom(3000))
    (tmp_path / "n.safetensors").write_bytes(os.urandom(100))
    out, dest = tmp_path / "out", tmp_path / "dest"
    packing.split_files([tmp_path / "n.safetensors"], "n", out, part_bytes=1000)  # a good stage beside it
    packing.split_files([tmp_path / "m.safetensors"], "m", out, part_bytes=1000)
    part = out / "m.part01"
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[500] ^= 1
        part.write_bytes(bytes(data))
    elif damage == "truncate":
        part.write_bytes(bytes(data[:-1]))
    else:
        part.unlink()
    with pytest.raises(UserError, match="m: part .*m.part01 (is missing|does not match its sha256)") as err:
        packing.main(["join", str(out), "--dest", str(dest)])
    assert "\n" not in str(err.value) and not dest.exists()


# ----------------------------------------------------------------------------------------------
# The travelling tree


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def test_travelling_size_and_shelving_leave_the_shipped_models_behind_and_restore_them(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("/.gpu/\n/runs/\n")
    (repo / "models" / "unet-a.safetensors").write_bytes(b"u" * 5000)
    (repo / "code.py").write_bytes(b"c" * 100)
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    (repo / "new.py").write_bytes(b"n" * 10)  # untracked, not ignored: travels
    (repo / "runs").mkdir()
    (repo / "runs" / "big").write_bytes(b"r" * 9000)  # ignored: stays
    (repo / ".gpu").mkdir()
    (repo / ".gpu" / "codes").write_bytes(b"g" * 700)  # ignored, carried: travels
    tree = 5000 + 100 + 10 + len("/.gpu/\n/runs/\n")
    assert packing.travelling_size(repo, [".gpu"]) == (tree, 700, tree + 700)
    assert packing.travelling_size(repo, [".gpu"], ["models/unet-a.safetensors"])[0] == tree - 5000
    with pytest.raises(UserError, match="would send .* MiB, over 0.005 MiB"):
        packing.main(["size", "--repo", str(repo), "--carry", ".gpu", "--limit_mib", "0.005"])

    exclude = repo / ".git" / "info" / "exclude"
    before = exclude.read_text()
    packing.shelve(repo, ["models/unet-a.safetensors"])
    packing.shelve(repo, ["models/unet-a.safetensors"])  # again: nothing more to do
    assert "models/unet-a.safetensors" not in git(repo, "ls-files")  # untracked, and excluded (no "??" line):
    assert git(repo, "status", "--porcelain", "--untracked-files=all", "models") == "D  models/unet-a.safetensors\n"
    assert (repo / "models" / "unet-a.safetensors").read_bytes() == b"u" * 5000
    assert packing.travelling_size(repo, [".gpu"])[0] == tree - 5000
    packing.main(["size", "--repo", str(repo), "--carry", ".gpu", "--limit_mib", "0.005"])
    assert "= 0.0 MiB (limit 0.005 MiB)" in capsys.readouterr().out
    (repo / "models" / "unet-a.safetensors").write_bytes(b"v" * 5000)  # a model brought back from the GPU machine
    assert packing.restore(repo) == ["models/unet-a.safetensors"]
    assert exclude.read_text() == before and "models/unet-a.safetensors" in git(repo, "ls-files")
    assert git(repo, "status", "--porcelain", "models") == " M models/unet-a.safetensors\n"
    assert packing.restore(repo) == []
    with pytest.raises(UserError, match="uncommitted changes"):
        packing.shelve(repo, ["models/unet-a.safetensors"])


def test_timeline_keeps_a_few_lines_and_the_last(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "epoch": s / 10, "samples_per_s": 100.0, "loss": 1 / s}) + "\n"
                           for s in range(1, 101)))
    lines = packing.timeline(log, max_lines=5)
    assert len(lines) == 5 and lines[0].split()[:2] == ["step", "1"] and lines[-1].split()[:2] == ["step", "100"]
    assert packing.timeline(tmp_path / "missing.jsonl") == [f"{tmp_path / 'missing.jsonl'}: no log entries"]


# ----------------------------------------------------------------------------------------------
# The smoke path: the three scripts end to end on the CPU, as in the README's "A rented GPU machine"


def run_script(args, env):
    result = subprocess.run(["bash", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(not os.environ.get("NOISE2ART_SMOKE"), reason="minutes of CPU: run with NOISE2ART_SMOKE=1")
def test_smoke_run_packs_trains_exports_and_unpacks_models_that_sample(tmp_path, wikiart_mini):
    """The README's smoke commands (about 20 Python start-ups and two small-UNet exports: several minutes here, so
    it runs on request: NOISE2ART_SMOKE=1 python -m pytest tests/test_packing.py -k smoke)."""
    out, models = tmp_path / "out", tmp_path / "models"
    env = {**os.environ, "SMOKE": "1", "MAX_IMAGES": "4", "DATA": str(wikiart_mini), "CARRY": str(tmp_path / "carry"),
           "CACHE": str(tmp_path / "cache"), "WORK": str(tmp_path / "work"), "OUT": str(out),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    packed = run_script(["experiments/gpu_pack.sh"], env)
    assert "packed 4 images x 2 flips as 11-bit codes" in packed and "(limit 60 MiB)" in packed
    assert packing.shelved_paths(ROOT) == []  # SMOKE leaves git alone
    run_script(["experiments/train_gpu.sh"], env)
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_cpu.json", "log.txt", "manifest.json", "unet-cond.part00", "unet-cond.part01", "unet-uncond.part00",
        "unet-uncond.part01"]
    log = (out / "log.txt").read_text()
    assert "unet-cond: exported" in log and "step      3" in log and "samples/s" in log
    models.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(ROOT / "models" / f"vqgan{suffix}", models)
    run_script(["experiments/gpu_unpack.sh", out, models], env)
    assert sorted(p.name for p in models.iterdir()) == [
        "unet-cond.json", "unet-cond.safetensors", "unet-uncond.json", "unet-uncond.safetensors", "vqgan.json",
        "vqgan.safetensors"]
    cond_config = json.loads((models / "unet-cond.json").read_text())
    assert cond_config["vqgan"] == "vqgan" and cond_config["unet"]["pooled_text_embed"]
    assert diffusion.main(["--unet_ckpt_path", str(models / "unet-cond"), "--prompt", "a Baroque painting",
                           "--num_images", "1", "--steps", "2", "--outdir", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "grid-00000.png").is_file()
