"""evaluate.py: the feature networks (FID Inception plumbing with random weights), the real-set cache, the three
command jobs (score two folders, sample a diffusion checkpoint first, evaluate a VQGAN) and bad input. The metrics
themselves are tested in test_metrics.py."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
from torchvision.models import inception

import evaluate
from cli import UserError
from conftest import make_painting
from diffusion import save_diffusion_model
from evaluate import (
    FIDInceptionA, FIDInceptionE, FIDInceptionV3, extract_features, load_feature_network, real_stats_key,
    stats_cache_path,
)
from images import ImageSource, ImageTensorDataset
from metrics import code_statistics, frechet_distance, kid, mean_and_covariance, psnr, ssim
from schedule import NoiseSchedule
from unet import UNET_CONFIGS, UNet
from vqgan import CONFIGS, VQModel, save_vqgan


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on a shared, busy CPU: one thread is faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder, seeds, edit=None):
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        img = make_painting(seed)
        (edit(img) if edit else img).save(folder / f"{seed:05d}.png")
    return folder


def degrade(img):
    """Blurred and washed out: what a worse generator gives."""
    return ImageEnhance.Color(img.filter(ImageFilter.GaussianBlur(3))).enhance(0.3)


def mean_colour_features(images):
    """A cheap stand-in feature network (B x 12): mean colour of each image quadrant."""
    return F.adaptive_avg_pool2d(images, 2).flatten(1)


@pytest.fixture
def cheap_features(monkeypatch):
    """Replace the feature network by mean_colour_features, for tests of the plumbing around it."""
    monkeypatch.setattr(evaluate, "load_feature_network", lambda name, device="cpu", weights=None: mean_colour_features)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Randomly initialised FIDInceptionV3 weights saved as the real file is: a plain torch state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / evaluate.FID_INCEPTION_WEIGHTS
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def run(argv, capsys):
    assert evaluate.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Feature networks and real images


def test_degraded_images_score_worse_than_clean_ones_with_effnet_features(tmp_path):
    network = load_feature_network("effnet-lite0")
    sets = {"real": (range(40), None), "clean": (range(100, 140), None), "degraded": (range(100, 140), degrade)}
    features = {}
    for name, (seeds, edit) in sets.items():
        folder = write_images(tmp_path / name, seeds, edit)
        dataset = evaluate.PreparedImages(ImageSource(folder), list(range(40)), 224)
        features[name] = extract_features(network, torch.utils.data.DataLoader(dataset, batch_size=20), "cpu")
    assert features["real"].shape == (40, 1280)
    real_stats = mean_and_covariance(features["real"])
    fd = {name: frechet_distance(*real_stats, *mean_and_covariance(features[name])) for name in ("clean", "degraded")}
    kids = {name: kid(features["real"], features[name], subsets=20, subset_size=30)[0]
            for name in ("clean", "degraded")}
    assert fd["degraded"] > 1.5 * fd["clean"]
    assert kids["degraded"] > kids["clean"] + 0.05


def test_fid_blocks_differ_from_torchvision_only_where_the_pool_sees_padding():
    torch.manual_seed(0)
    x = torch.randn(1, 192, 7, 7)
    for fid_block, block in ((FIDInceptionA(192, pool_features=32), inception.InceptionA(192, pool_features=32)),
                             (FIDInceptionE(192), inception.InceptionE(192))):
        block.load_state_dict(fid_block.state_dict())
        with torch.no_grad():
            diff = (fid_block.eval()(x) - block.eval()(x)).abs().amax(dim=1)[0]  # 7 x 7
        assert diff[1:-1, 1:-1].max() < 1e-5 and diff[0].min() > 0 and diff[:, 0].min() > 0
    max_block = FIDInceptionE(192)
    max_block.pool = "max"
    avg_block = FIDInceptionE(192)
    avg_block.load_state_dict(max_block.state_dict())
    with torch.no_grad():  # Mixed_7c's max pool changes the pool branch (its last 192 channels) everywhere
        assert not torch.allclose(max_block.eval()(x)[:, -192:, 3, 3], avg_block.eval()(x)[:, -192:, 3, 3])


def test_inception_loads_weights_from_a_file_and_gives_2048_features(inception_weights):
    network = load_feature_network("inception", "cpu", inception_weights)
    reference = FIDInceptionV3().eval()
    reference.load_state_dict(torch.load(inception_weights, weights_only=True))
    images = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        features = network(images.contiguous(memory_format=torch.channels_last))
        assert features.shape == (2, 2048)
        assert torch.allclose(features, reference(images), atol=1e-4)
        assert network(images[:, :, :200, :250]).shape == (2, 2048)  # other sizes are resized to 299 x 299


def test_inception_weights_missing_or_mismatched_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError, match="--inception_weights"):
        load_feature_network("inception")
    with pytest.raises(UserError, match="Inception weights not found"):
        load_feature_network("inception", inception_weights=tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UserError, match="does not match"):
        load_feature_network("inception", inception_weights=wrong)
    with pytest.raises(UserError, match="unknown feature network"):
        load_feature_network("resnet")


def test_inception_is_found_in_the_torch_hub_cache_and_named_in_the_output(
        tmp_path, monkeypatch, capsys, inception_weights):
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / inception_weights.name).symlink_to(inception_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    real, fake = write_images(tmp_path / "real", range(3)), write_images(tmp_path / "fake", range(10, 13))
    out = run(["--real", real, "--fake", fake, "--features", "inception", "--no_cache", "--out", tmp_path / "r.json"],
              capsys)
    assert "FD_inception (FID)" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["features"] == "inception" and results["FD_inception"] > 0 and "FD_effnet-lite0" not in results


# ----------------------------------------------------------------------------------------------
# The command: two folders, the real-set cache


def test_cli_scores_two_folders_names_the_network_and_writes_json(tmp_path, capsys, image_folder):
    fake = write_images(tmp_path / "fake", range(100, 112), degrade)
    out = run(["--real", image_folder, "--fake", fake, "--cache_dir", tmp_path / "cache", "--out", tmp_path / "r.json"],
              capsys)
    assert "FD_effnet-lite0" in out and "KID_effnet-lite0" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["features"] == "effnet-lite0" and results["n_real"] == results["n_fake"] == 12
    assert results["FD_effnet-lite0"] > 0 and results["KID_effnet-lite0"] > 0 and "224" in results["resize"]
    assert f"{results['FD_effnet-lite0']:.4f}" in out


def test_thumbnail_features_are_the_pixels_of_16px_thumbnails(tmp_path, capsys, image_folder):
    """The judge that shares nothing with ImageNet networks: FD of 768-d thumbnail pixels, exactly as computed here."""
    import numpy as np

    from images import ImageSource, image_to_tensor
    from metrics import frechet_distance, mean_and_covariance

    fake = write_images(tmp_path / "fake", range(100, 112), degrade)
    run(["--real", image_folder, "--fake", fake, "--features", "thumbnail16", "--cache_dir", tmp_path / "cache",
         "--out", tmp_path / "r.json"], capsys)
    results = json.loads((tmp_path / "r.json").read_text())

    def thumbnails(folder):
        source = ImageSource(str(folder))
        return np.stack([image_to_tensor(source.image(i), 16).flatten().numpy() for i in range(len(source))])

    expected = frechet_distance(*mean_and_covariance(thumbnails(image_folder)),
                                *mean_and_covariance(thumbnails(fake)))
    assert results["features"] == "thumbnail16" and results["FD_thumbnail16"] == pytest.approx(expected, rel=1e-3)


def test_real_statistics_are_cached_reused_and_keyed(tmp_path, capsys, monkeypatch, cheap_features,
                                                     inception_weights):
    real, fake = write_images(tmp_path / "real", range(10)), write_images(tmp_path / "fake", range(20, 30))
    computed = []

    def counting_set_features(source, rows, network, size, loading, what):
        computed.append(what)
        return set_features(source, rows, network, size, loading, what)

    set_features = evaluate.set_features
    monkeypatch.setattr(evaluate, "set_features", counting_set_features)
    cache = tmp_path / "cache"
    argv = ["--real", real, "--fake", fake, "--cache_dir", cache, "--out", tmp_path / "r.json"]
    run(argv, capsys)
    first = json.loads((tmp_path / "r.json").read_text())
    (path,) = cache.glob("*.npz")
    mtime = path.stat().st_mtime_ns
    with np.load(path, allow_pickle=False) as data:
        assert data["features"].shape == (10, 12) and data["sigma"].shape == (12, 12)
        assert np.allclose(data["mu"], data["features"].mean(axis=0))

    out = run(argv, capsys)
    assert computed == ["real", "fake", "fake"] and "real-set statistics from" in out
    assert path.stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "r.json").read_text())["FD_effnet-lite0"] == first["FD_effnet-lite0"]

    run(argv + ["--n", "6"], capsys)  # another n: another file
    assert computed[3:] == ["real", "fake"] and len(list(cache.glob("*.npz"))) == 2
    run(argv + ["--resolution", "16"], capsys)  # another resize: another file
    assert len(list(cache.glob("*.npz"))) == 3
    run(argv + ["--no_cache"], capsys)
    assert computed[-2:] == ["real", "fake"] and len(list(cache.glob("*.npz"))) == 3

    paths = {net: stats_cache_path(cache, real_stats_key(evaluate.RealSet(str(real)), 10, list(range(10)), None, net,
                                                         inception_weights))
             for net in ("effnet-lite0", "inception")}
    assert paths["effnet-lite0"] == path and paths["inception"] != path  # another feature network: another file


def test_a_cache_file_holding_other_statistics_is_recomputed(tmp_path, capsys, cheap_features):
    real, fake = write_images(tmp_path / "real", range(4)), write_images(tmp_path / "fake", range(20, 24))
    argv = ["--real", real, "--fake", fake, "--cache_dir", tmp_path / "cache"]
    run(argv, capsys)
    (path,) = (tmp_path / "cache").glob("*.npz")
    path.write_bytes(b"not an npz")
    out = run(argv, capsys)
    assert "wrote real-set statistics" in out
    with np.load(path, allow_pickle=False) as data:
        assert data["features"].shape == (4, 12)


# ----------------------------------------------------------------------------------------------
# Sampling a diffusion checkpoint first, and VQGAN reconstructions


@pytest.fixture(scope="module")
def diffusion_checkpoint(tmp_path_factory):
    return save_tiny_diffusion_model(tmp_path_factory.mktemp("diffusion") / "unet")


def save_tiny_diffusion_model(path):
    """A tiny random unconditional model (8x8 latents -> 32x32 images) with its VQGAN embedded, saved at path."""
    torch.manual_seed(0)
    unet = UNet(**{**UNET_CONFIGS["tiny"], "sample_size": 8, "attention_resolutions": [8]})
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    config = dict(unet=unet.config, schedule=NoiseSchedule("linear").config, prediction_type="epsilon",
                  latent_shape=[4, 8, 8], latent_scale=1.0, text_encoder=None, training={})
    save_diffusion_model(path, unet.state_dict(), None, config, vqgan=VQModel(CONFIGS["vq-f4-tiny"]))
    return path


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img).copy()


def test_samples_from_generates_resumes_and_scores(tmp_path, capsys, monkeypatch, cheap_features, image_folder,
                                                   diffusion_checkpoint):
    argv = ["--samples_from", f"{diffusion_checkpoint}.json", "--n", 4, "--real", image_folder, "--sampler", "ddim",
            "--steps", 2, "--batch_size", 3, "--no_cache", "--out", tmp_path / "r.json"]
    out = run(argv, capsys)
    fake = diffusion_checkpoint.parent / "unet_samples_ddim_2_seed0"
    assert sorted(p.name for p in fake.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert pixels(fake / "00000.png").shape == (32, 32, 3)
    assert json.loads((fake / "samples.json").read_text())["steps"] == 2
    # the protocol's default is dpmpp-2m at 20 steps, whatever diffusion.py's unprompted default
    assert evaluate.sampling_options(evaluate.parse_args(["--samples_from", "m", "--real", "r"]))["steps"] == 20
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n_fake"] == 4 and results["fake"] == str(fake) and "FD_effnet-lite0" in out

    # image i comes from seed + i whatever the batch: a deleted image is redone alone, pixel for pixel
    original = pixels(fake / "00002.png")
    (fake / "00002.png").unlink()
    run(argv[:-5] + ["--batch_size", 1, "--no_cache"], capsys)
    assert np.array_equal(pixels(fake / "00002.png"), original)

    # everything present: no model is loaded (the checkpoint may be named without .json)
    monkeypatch.setattr(evaluate, "load_diffusion_model", lambda *a, **k: pytest.fail("sampled again"))
    run(["--samples_from", diffusion_checkpoint] + argv[2:], capsys)
    with pytest.raises(UserError, match="other settings"):
        evaluate.main([str(a) for a in argv[:6]] + ["--steps", "3", "--fake", str(fake)])
    # the same path holding other weights (a model retrained in place) is another set of samples
    weights = diffusion_checkpoint.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes() + b" ")  # refused before the model is loaded
    with pytest.raises(UserError, match="other settings"):
        run(argv, capsys)


def test_skip_done_keeps_the_results_of_this_evaluation_and_refuses_another_models(tmp_path, capsys, monkeypatch,
                                                                                    cheap_features, image_folder):
    checkpoint = save_tiny_diffusion_model(tmp_path / "model" / "unet")
    out = tmp_path / "r.json"
    argv = ["--samples_from", checkpoint, "--n", 2, "--real", image_folder, "--sampler", "ddim", "--steps", 1,
            "--no_cache", "--fake", tmp_path / "fake", "--out", out, "--skip_done"]
    first = run(argv, capsys)
    results = json.loads(out.read_text())
    assert results["request"]["samples"]["checkpoint_sha256"] == evaluate.checkpoint_digest(checkpoint)
    assert results["request"]["n"] == 2 and "wrote" in first

    # the same request again: nothing is computed, the stored figures are shown
    monkeypatch.setattr(evaluate, "load_feature_network", lambda *a, **k: pytest.fail("evaluated again"))
    again = run(argv, capsys)
    assert "kept" in again and f"{results['FD_effnet-lite0']:.4f}" in again
    assert json.loads(out.read_text()) == results
    # another request into the same --out: the metric settings, or the model retrained in place
    with pytest.raises(UserError, match="holds the results of another evaluation"):
        evaluate.main([str(a) for a in argv] + ["--kid_subsets", "7"])
    weights = checkpoint.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(UserError, match="holds the results of another evaluation"):
        run(argv, capsys)
    assert json.loads(out.read_text()) == results  # refused, not overwritten
    # the flag needs --samples_from and --out
    with pytest.raises(UserError, match="--skip_done needs --samples_from and --out"):
        evaluate.main([str(a) for a in argv if a != "--skip_done"][:-2] + ["--skip_done"])


def test_checkpoint_digest_covers_the_referenced_vqgan(tmp_path):
    torch.manual_seed(0)
    unet = UNet(**{**UNET_CONFIGS["tiny"], "sample_size": 8, "attention_resolutions": [8]})
    vqgan = VQModel(CONFIGS["vq-f4-tiny"])
    save_vqgan(vqgan, tmp_path / "vq" / "vqgan")
    config = dict(unet=unet.config, schedule=NoiseSchedule("linear").config, prediction_type="epsilon",
                  latent_shape=[4, 8, 8], latent_scale=1.0, text_encoder=None, training={})
    save_diffusion_model(tmp_path / "models" / "unet", unet.state_dict(), None, config, vqgan=tmp_path / "vq" / "vqgan")
    before = evaluate.checkpoint_digest(tmp_path / "models" / "unet")
    assert evaluate.checkpoint_digest(tmp_path / "models" / "unet.json") == before  # any name of the same files
    with torch.no_grad():
        vqgan.decoder.conv_out.weight.add_(0.01)  # a fine-tuned decoder, saved in place
    save_vqgan(vqgan, tmp_path / "vq" / "vqgan")
    assert evaluate.checkpoint_digest(tmp_path / "models" / "unet") != before
    (tmp_path / "vq" / "vqgan.safetensors").unlink()
    with pytest.raises(UserError, match="VQGAN file not found: .*vqgan.safetensors"):
        evaluate.checkpoint_digest(tmp_path / "models" / "unet")


def test_vqgan_evaluation_metrics_codebook_and_grid(tmp_path, capsys, cheap_features, image_folder):
    """The one VQGAN evaluation: PSNR, SSIM, codebook usage and perplexity, reconstruction FD, and the grid PNG."""
    torch.manual_seed(0)
    model = VQModel(CONFIGS["vq-f4-tiny"]).eval()
    save_vqgan(model, tmp_path / "vqgan")
    grid = tmp_path / "grid.png"
    out = run(["--vqgan_ckpt", tmp_path / "vqgan", "--real", image_folder, "--out", tmp_path / "r.json",
               "--batch_size", 5, "--grid", grid], capsys)
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n"] == 12 and results["resolution"] == 32 and "rFD_effnet-lite0" in out
    images = torch.stack(list(ImageTensorDataset(ImageSource(image_folder), 32, random_crop=False, flip=False)))
    with torch.no_grad():
        reconstructions, _, indices, _ = model(images)
    reconstructions = reconstructions.clamp(-1, 1)
    assert results["PSNR"] == pytest.approx(psnr(reconstructions, images).mean().item(), rel=1e-5)
    assert results["SSIM"] == pytest.approx(ssim(reconstructions, images).mean().item(), rel=1e-5, abs=1e-6)
    usage, perplexity = code_statistics(torch.bincount(indices.flatten(), minlength=256).float())
    assert results["code_usage"] == pytest.approx(usage) and results["perplexity"] == pytest.approx(perplexity)
    assert results["rFD_effnet-lite0"] > 0 and "code_usage" in out and "perplexity" in out
    with Image.open(grid) as img:  # 12 images: rows of 8 and 4 originals, each over its reconstructions
        assert img.size == (8 * 32, 4 * 32)
        assert json.loads(img.text["PSNR"]) == pytest.approx(results["PSNR"])


@pytest.fixture
def two_split_dataset(tmp_path):
    """A local Hugging Face dataset (parquet): `train` holds 12 paintings, `test` 8 others."""
    import datasets

    folder = tmp_path / "paintings"
    (folder / "data").mkdir(parents=True)
    for split, seeds in (("train", range(12)), ("test", range(100, 108))):
        rows = {"image": [make_painting(seed) for seed in seeds]}
        dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_vqgan_reference_split_puts_the_decoded_fd_beside_the_floor(tmp_path, capsys, monkeypatch, cheap_features,
                                                                    two_split_dataset):
    """--reference_split test: train originals and their reconstructions, each against all of `test`. A decoder
    that returns its input costs nothing over the floor (ratio 1); a real one costs more."""
    torch.manual_seed(0)
    save_vqgan(VQModel(CONFIGS["vq-f4-tiny"]).eval(), tmp_path / "vqgan")
    argv = ["--vqgan_ckpt", tmp_path / "vqgan", "--real", two_split_dataset, "--real_split", "train",
            "--reference_split", "test", "--out", tmp_path / "r.json", "--cache_dir", tmp_path / "cache"]
    out = run(argv, capsys)
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n"] == 12 and results["n_reference"] == 8 and results["reference_split"] == "test"
    floor, decoded = results["floor_FD_effnet-lite0"], results["dFD_effnet-lite0"]
    assert floor > 0 and decoded != pytest.approx(floor)
    assert results["dFD_over_floor"] == pytest.approx(decoded / floor) and "dFD_over_floor" in out

    monkeypatch.setattr(evaluate, "reconstruct", lambda model, images, bf16=False: (images, torch.zeros(
        len(images), 8, 8, dtype=torch.long)))
    run(argv, capsys)
    perfect = json.loads((tmp_path / "r.json").read_text())
    assert perfect["floor_FD_effnet-lite0"] == pytest.approx(floor)
    assert perfect["dFD_over_floor"] == pytest.approx(1.0) and perfect["rFD_effnet-lite0"] == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("extra, message", [
    (["--n", "1"], "argument --n: must be at least 2, got 1"),
    (["--fake", "MISSING"], "fake image folder not found"),
    (["--vqgan_ckpt", "v", "--samples_from", "s"], "separate jobs"),
    (["--vqgan_ckpt", "v"], "--fake does not apply"),
    (["--grid", "g.png"], "--grid .* needs --vqgan_ckpt"),
    (["--reference_split", "test"], "--reference_split .* needs --vqgan_ckpt"),
    (["--kid_subset_size", "1"], "--kid_subset_size"),
    (["--samples_from", "MISSING"], "diffusion checkpoint config not found"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, extra, message, image_folder):
    argv = ["--real", str(image_folder), "--fake", str(image_folder)]
    argv = [str(tmp_path / a) if a == "MISSING" else a for a in argv + extra]
    with pytest.raises(UserError, match=message):
        evaluate.main(argv)


def test_nothing_to_compare_and_unknown_network(image_folder):
    with pytest.raises(UserError, match="nothing to compare"):
        evaluate.main(["--real", str(image_folder)])
    with pytest.raises(UserError, match="argument --features: invalid choice: 'resnet'"):
        evaluate.main(["--real", str(image_folder), "--fake", str(image_folder), "--features", "resnet"])


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path, monkeypatch, image_folder):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "unet.json").write_text("{}")
    monkeypatch.setattr(evaluate, "load_feature_network", lambda *a, **k: pytest.fail("work started"))
    base = ["--real", str(image_folder), "--fake", str(image_folder)]
    with pytest.raises(UserError, match="--out .* is a folder: give a file name"):
        evaluate.main(base + ["--out", str(tmp_path)])
    with pytest.raises(UserError, match="taken is a file, not a folder"):
        evaluate.main(base + ["--out", str(tmp_path / "taken" / "r.json")])
    with pytest.raises(UserError, match="--fake .*taken is a file, not a folder"):
        evaluate.main(["--real", str(image_folder), "--samples_from", str(tmp_path / "unet.json"), "--fake",
                       str(tmp_path / "taken")])


def test_diffusion_grids_in_a_fake_folder_are_not_samples(tmp_path, capsys, cheap_features, image_folder):
    fake = write_images(tmp_path / "samples", range(100, 103))
    make_painting(0, (64, 64)).save(fake / "grid-00000.png")  # what diffusion.py writes next to its images
    run(["--real", image_folder, "--fake", fake, "--no_cache", "--out", tmp_path / "r.json"], capsys)
    assert json.loads((tmp_path / "r.json").read_text())["n_fake"] == 3


def test_too_few_readable_images_is_an_error(tmp_path, cheap_features, image_folder):
    fake = write_images(tmp_path / "fake", [0])
    (fake / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="has 1 readable image"):
        evaluate.main(["--real", str(image_folder), "--fake", str(fake), "--no_cache"])


def test_command_line_error_is_one_line_with_exit_status_2(tmp_path):
    argv = [sys.executable, evaluate.__file__, "--real", str(tmp_path), "--fake", str(tmp_path / "x")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: fake image folder not found: {tmp_path / 'x'}"]


def test_real_where_scores_against_the_images_of_one_style(tmp_path, capsys, monkeypatch, cheap_features,
                                                           image_folder):
    """--real_where style=Baroque: the real set is the 4 Baroque paintings of 12 (rows 0, 3, 6, 9), cached apart
    from the whole set's statistics; a column or value that is not there is a clear error."""
    fake = write_images(tmp_path / "fake", range(20, 26))
    scored = []

    def recording_set_features(source, rows, network, size, loading, what):
        scored.append((what, list(rows)))
        return set_features(source, rows, network, size, loading, what)

    set_features = evaluate.set_features
    monkeypatch.setattr(evaluate, "set_features", recording_set_features)
    argv = ["--real", image_folder, "--fake", fake, "--cache_dir", tmp_path / "cache", "--out", tmp_path / "r.json"]
    run(argv + ["--real_where", "style=Baroque"], capsys)
    results = json.loads((tmp_path / "r.json").read_text())
    assert scored == [("real", [0, 3, 6, 9]), ("fake", list(range(6)))]
    assert results["n_real"] == 4 and results["real_where"] == [["style", "Baroque"]]
    run(argv, capsys)  # the whole set: its own statistics, not the Baroque ones
    assert scored[2] == ("real", list(range(12))) and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    with pytest.raises(UserError, match="no --real image has style = 'Rococo'"):
        evaluate.main([str(a) for a in argv + ["--real_where", "style=Rococo"]])
    with pytest.raises(UserError, match="no metadata column 'genre'"):
        evaluate.main([str(a) for a in argv + ["--real_where", "genre=portrait"]])
    with pytest.raises(UserError, match="--real_where: expected COLUMN=VALUE, e.g. style=Baroque, not 'Baroque'"):
        evaluate.parse_args(["--real", "r", "--real_where", "Baroque"])


def test_column_values_of_a_class_label_are_names(wikiart_mini):
    source = ImageSource(wikiart_mini, "test")
    styles = source.column_values("style")
    assert len(styles) == len(source) == 700 and styles[0] == source.metadata(0)["style"]
    assert {"Baroque", "Impressionism"} <= set(styles) and all(isinstance(s, str) for s in styles)
