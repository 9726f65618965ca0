"""prior.py on synthetic embedding caches (image_embedding.py's format: N x D float16 + {"dim", "captions"}):
a short training makes samples match held-out data, a caption-conditioned prior with guidance samples each caption's
cluster, checkpoints and training states round-trip, rows are seeded one by one, and bad input is one clear line."""
import subprocess
import sys
import zlib

import pytest
import torch

import prior
from checkpoints import save_model
from cli import UserError
from conftest import ROOT

def mixture(num, dim, centres, spread, seed):
    """num x dim draws from equal-weight isotropic Gaussians around `centres` (K x dim), and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(centres), (num,), generator=generator)
    return centres[labels] + spread * torch.randn(num, dim, generator=generator), labels


def write_cache(path, embeddings, captions=None, dim=None):
    """An embedding cache as image_embedding.py writes one: embeddings N x D, one per painting."""
    config = {"model": "noise2art-embedding-cache", "dim": embeddings.shape[-1] if dim is None else dim,
              "captions": captions}
    save_model(path, {"embeddings": embeddings.half()}, config)
    return path


def clustered(num, dim=8, clusters=4, seed=0):
    """Whitened-looking clusters: K tight blobs on a sphere, about unit variance per dimension overall."""
    centres = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(100 + seed))
    centres = centres / centres.norm(dim=1, keepdim=True) * dim**0.5
    return mixture(num, dim, centres, 0.25, seed)


class HashTextEncoder:
    """TextEncoder's interface without weights: two fixed random tokens per caption (seeded by its CRC)."""

    name, dim, max_length = "hash-encoder", 16, 2

    def encode(self, captions):
        tokens = torch.stack([torch.randn(2, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                              for c in captions])
        return tokens, torch.ones(len(captions), 2, dtype=torch.bool)


def tiny_prior(data_vectors, text_encoder=None, seed=0):
    torch.manual_seed(seed)
    return prior.new_prior(data_vectors, 64, 2, text_encoder, prior.DEFAULT_SCHEDULE["kind"], prior.DEFAULT_PREDICTION)


def quick_train(data_vectors, steps, captions=None, text_encoder=None, seed=0, **train_options):
    run = prior.PriorTraining(tiny_prior(data_vectors, text_encoder, seed), 2e-3, 0.0, seed)
    data = prior.training_data(data_vectors, captions, text_encoder, "cpu")
    prior.train(run, data, steps, 128, 2e-3, 20, **train_options)
    return run


@pytest.fixture(scope="module")
def trained():
    """(EMA prior after 600 steps, training vectors, held-out vectors) on 4 clusters in 8 dimensions."""
    points, _ = clustered(1200)
    train_vectors, held_out = points[:1000], points[1000:]
    return quick_train(train_vectors, 600).ema, train_vectors, held_out


# ----------------------------------------------------------------------------------------------
# Learning the distribution


def test_training_matches_held_out_moments_and_clusters(trained):
    ema, train_vectors, held_out = trained
    statistics = prior.mean_and_covariance(held_out.numpy())
    untrained = tiny_prior(train_vectors)
    fd_before = prior.frechet_to(prior.sample_embeddings(untrained, 400, seed=0), statistics)
    samples = prior.sample_embeddings(ema, 400, seed=0)
    fd_after = prior.frechet_to(samples, statistics)
    floor = prior.frechet_to(train_vectors[:400], statistics)  # real data: FD's floor at these sizes
    assert fd_after < fd_before / 20 and fd_after < 3 * floor, (fd_before, fd_after, floor)
    # FD sees only means and covariances: a Gaussian with the data's scores as well. The samples must also land in
    # the clusters (precision), where the Gaussian's fall between them.
    gaussian = torch.distributions.MultivariateNormal(train_vectors.mean(0), torch.cov(train_vectors.T))
    gaussian_precision, _ = prior.precision_recall(gaussian.sample((400,)), held_out)
    precision, recall = prior.precision_recall(samples, held_out)
    assert precision > 0.6 > 0.2 > gaussian_precision and recall > 0.6, (precision, recall, gaussian_precision)


def test_rows_are_seeded_one_by_one(trained):
    ema = trained[0]
    batch = prior.sample_embeddings(ema, 4, seed=10, steps=10)
    assert torch.allclose(batch[2:3], prior.sample_embeddings(ema, 1, seed=12, steps=10), atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_nearest_prior_draws_training_rows_plus_noise():
    train_vectors = torch.arange(40.0).reshape(10, 4)
    exact = prior.nearest_prior_sample(train_vectors, 6, seed=3, noise_std=0.0)
    assert all(any(torch.equal(row, t) for t in train_vectors) for row in exact)
    assert torch.equal(exact[1:2], prior.nearest_prior_sample(train_vectors, 1, seed=4, noise_std=0.0))
    noisy = prior.nearest_prior_sample(train_vectors, 6, seed=3, noise_std=0.5)
    assert 0.2 < (noisy - exact).std() < 1.0  # the same rows, plus N(0, 0.5^2) noise


def test_guidance_separates_two_captions():
    centres = torch.tensor([[2.0] * 4 + [0.0] * 4, [-2.0] * 4 + [0.0] * 4])
    points, labels = mixture(600, 8, centres, 0.5, seed=1)
    names = ["an Impressionism painting", "a Cubism painting"]
    captions = [names[k] for k in labels.tolist()]
    run = quick_train(points, 500, captions, HashTextEncoder(), cond_drop=0.2)
    for name, centre in zip(names, centres):
        def share_near_centre(scale):  # of 100 samples under caption `name`
            samples = prior.sample_embeddings(run.ema, 100, seed=0, captions=name, guidance_scale=scale,
                                              text_encoder=HashTextEncoder())
            return (centres[torch.cdist(samples, centres).argmin(1)] == centre).all(1).float().mean()

        assert share_near_centre(2.0) > 0.9, name
        assert 0.25 < share_near_centre(0.0) < 0.75, name  # scale 0: the unconditional branch alone
    unconditional = torch.cdist(prior.sample_embeddings(run.ema, 200, seed=0), centres).argmin(1)
    assert 0.25 < unconditional.float().mean() < 0.75  # without a caption: both clusters


# ----------------------------------------------------------------------------------------------
# Files: the command line, checkpoints, resume


@pytest.fixture
def cache(tmp_path):
    points, labels = clustered(60)
    return write_cache(tmp_path / "cache", points, [f"kind {k}" for k in labels.tolist()])


def train_cli(cache, out, *flags):
    return prior.main(["--embeddings", str(cache), "--out", str(out), "--width", "32", "--depth", "1",
                       "--batch_size", "16", "--warmup_steps", "2", "--log_every", "0", *map(str, flags)])


def test_checkpoint_round_trips_through_the_command_line(cache, tmp_path):
    out = tmp_path / "prior"
    assert train_cli(cache, out, "--max_steps", "12", "--holdout", "10") == 0
    loaded = prior.load_prior(out)
    _, config = prior.read_prior(out)
    assert config["prior"] == loaded.config and config["training"]["steps"] == 12
    assert config["embeddings"]["holdout"] == 10 and not config["conditional"]
    assert loaded.config["schedule"] == prior.DEFAULT_SCHEDULE
    copy_path = tmp_path / "copy"
    prior.save_prior(copy_path, loaded, {"weights": "ema"})
    again = prior.load_prior(copy_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    assert torch.equal(prior.sample_embeddings(loaded, 3, seed=1, steps=5),
                       prior.sample_embeddings(again, 3, seed=1, steps=5))
    assert (tmp_path / "prior-checkpoints" / "step_0000012").is_dir()


def test_evaluate_command_compares_the_priors(cache, tmp_path, capsys):
    out = tmp_path / "prior"
    train_cli(cache, out, "--max_steps", "5", "--holdout", "10")
    capsys.readouterr()
    assert prior.main(["--evaluate", str(out), "--embeddings", str(cache), "--num_samples", "40", "--steps", "5",
                       "--noise_std", "0.2"]) == 0
    text = capsys.readouterr().out
    for row in ("training paintings themselves", "learned prior", "training embedding + noise 0.2",
                "Gaussian with the training"):
        assert row in text
    assert "against the paintings held out of training (10)" in text


def test_conditional_command_line_trains_and_evaluates_on_captions(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("text_encoder.TextEncoder", lambda *args, **kwargs: HashTextEncoder())
    out = tmp_path / "prior"
    train_cli(cache, out, "--max_steps", "5", "--holdout", "10", "--conditional")
    _, config = prior.read_prior(out)
    assert config["conditional"] and config["prior"]["context_dim"] == 16
    assert config["prior"]["text_encoder"] == "hash-encoder"
    capsys.readouterr()
    prior.main(["--evaluate", str(out), "--embeddings", str(cache), "--num_samples", "40", "--steps", "5",
                "--noise_std", "0.2", "--guidance_scale", "1.5"])
    text = capsys.readouterr().out
    assert "learned prior, reference captions, guidance 1.5" in text
    assert "same-caption training embedding + noise 0.2" in text


def test_resume_continues_exactly():
    points, _ = clustered(100)
    full = quick_train(points, 16)
    saved = {}

    class StopAtEight:
        @property
        def name(self):
            return "SIGTERM" if half.step >= 8 else None

    half = prior.PriorTraining(tiny_prior(points), 2e-3, 0.0, 0)
    data = prior.training_data(points, None, None, "cpu")
    prior.train(half, data, 16, 128, 2e-3, 20, on_checkpoint=lambda run: saved.update(run.state()), stop=StopAtEight())
    assert saved["step"] == 8
    resumed = prior.PriorTraining(tiny_prior(points, seed=99), 2e-3, 0.0, 99)
    resumed.load_state(saved, "memory")
    prior.train(resumed, data, 16, 128, 2e-3, 20)
    for name, value in full.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), name


def test_resume_refuses_another_run(cache, tmp_path):
    out = tmp_path / "prior"
    train_cli(cache, out, "--max_steps", "4")
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_cli(cache, out, "--max_steps", "4")
    with pytest.raises(UserError, match="--width 32 there, 48 here"):
        prior.main(["--embeddings", str(cache), "--out", str(out), "--width", "48", "--depth", "1", "--batch_size",
                    "16", "--max_steps", "4", "--resume", "auto"])


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line


def one_line_error(call, match):
    with pytest.raises(UserError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_caches_are_one_clear_line(cache, tmp_path):
    one_line_error(lambda: train_cli(tmp_path / "missing", tmp_path / "p"), "embedding cache weights not found")
    wrong_dim = write_cache(tmp_path / "wrong_dim", torch.zeros(5, 8), dim=16)
    one_line_error(lambda: train_cli(wrong_dim, tmp_path / "p"), r"expected N x 16 .* got \(5, 8\)")
    two_views = write_cache(tmp_path / "two_views", torch.zeros(5, 2, 8))
    one_line_error(lambda: train_cli(two_views, tmp_path / "p"), r"expected N x 8 .* got \(5, 2, 8\)")
    uncaptioned = write_cache(tmp_path / "uncaptioned", torch.zeros(5, 8))
    one_line_error(lambda: train_cli(uncaptioned, tmp_path / "p", "--conditional"), "--conditional needs captions")
    short = write_cache(tmp_path / "short", torch.zeros(5, 8), captions=["a", "b"])
    one_line_error(lambda: train_cli(short, tmp_path / "p"), "a list of 5 strings")
    assert not (tmp_path / "p.safetensors").exists()


def test_bad_evaluation_input_is_one_clear_line(cache, tmp_path):
    out = tmp_path / "prior"
    train_cli(cache, out, "--max_steps", "2")
    other_dim = write_cache(tmp_path / "other_dim", torch.zeros(5, 4))
    one_line_error(lambda: prior.main(["--evaluate", str(out), "--embeddings", str(other_dim)]),
                   "generates 8-dim embeddings")
    one_line_error(lambda: prior.main(["--evaluate", str(out), "--embeddings", str(cache)]),
                   "trained on every painting of its cache: pass --reference")
    one_line_error(lambda: prior.main(["--evaluate", str(cache), "--embeddings", str(cache)]),
                   "is not a Noise2Art embedding prior")
    one_line_error(lambda: prior.sample_embeddings(prior.load_prior(out), 2, captions="a Baroque painting"),
                   "unconditional: it takes no caption")


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "prior.py", "--embeddings", str(tmp_path / "missing"), "--out",
                             str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: embedding cache weights not found: "
                                                  f"{tmp_path / 'missing.safetensors'}"]
