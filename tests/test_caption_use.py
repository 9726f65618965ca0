"""caption_use.py: the optimal denoiser of a pool, caption spreads, the grid measure, and the command on a tiny
conditional model."""
import json

import pytest
import torch

import caption_use
from caption_use import caption_spread, optimal_spread, optimal_x0, shuffled_pools
from cli import UserError
from conftest import make_painting
from diffusion import load_diffusion_model
from test_diffusion import write_checkpoint


def test_optimal_denoiser_averages_the_pool_at_high_noise_and_picks_the_nearest_at_low():
    torch.manual_seed(0)
    pool = torch.randn(5, 2, 4, 4)
    x0 = pool[3:4]
    noise = torch.randn_like(x0)
    low = torch.tensor(0.9999, dtype=torch.float64)  # alpha_bar near 1: almost no noise
    x_t = (low.sqrt() * x0 + (1 - low).sqrt() * noise).float()
    nearest, effective = optimal_x0(x_t, low, pool)
    assert torch.allclose(nearest, x0, atol=1e-4) and effective == pytest.approx(1, abs=1e-3)
    high = torch.tensor(1e-8, dtype=torch.float64)  # pure noise: the pool's mean, every image weighted alike
    mean, effective = optimal_x0(torch.randn_like(x0), high, pool)
    assert torch.allclose(mean, pool.mean(0, keepdim=True), atol=1e-3) and effective == pytest.approx(5, rel=1e-3)


def test_caption_spread_splits_layout_from_palette():
    base = torch.randn(3, 1, 4, 8, 8)
    recoloured = torch.cat([base, base + 0.5], dim=1)  # the second caption only shifts every channel's mean
    layout, palette = caption_spread(recoloured)
    assert layout == pytest.approx(0, abs=1e-6) and palette == pytest.approx(0.25)
    moved = torch.cat([base, base.flip(-1)], dim=1)  # the second caption mirrors the composition
    layout, palette = caption_spread(moved)
    assert layout > 0.1 and palette == pytest.approx(0, abs=1e-6)


def test_shuffled_pools_deal_the_same_latents_into_pools_of_the_same_sizes():
    pools = [torch.arange(n * 2.0).view(n, 2, 1, 1) + 100 * i for i, n in enumerate((3, 5, 4))]
    shuffled = shuffled_pools(pools, seed=0)
    assert [len(pool) for pool in shuffled] == [3, 5, 4]
    assert sorted(torch.cat(shuffled).flatten().tolist()) == sorted(torch.cat(pools).flatten().tolist())
    assert not all(torch.equal(a, b) for a, b in zip(pools, shuffled))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, shuffled_pools(pools, seed=0)))


def test_shuffled_control_separates_caption_signal_from_pool_noise():
    """Pools of one distribution spread only by pool noise, which shuffling keeps: their latents are exchangeable, so
    pools and their shuffled copies (of the same sizes, 4, 10 and 24, whose noise differs) are the same kind of draw
    and the squared layout spreads of both have one mean. Over 100 draws the mean of their paired difference lies
    within 4 standard errors of 0 (a control dealt into equal pools misses by about 20). Pools whose layouts differ
    by caption spread far more than their shuffled copies."""
    torch.manual_seed(0)
    alpha_bar = torch.tensor(0.01, dtype=torch.float64)  # high noise: each denoiser is near its pool's mean
    differences = []
    for seed in range(100):
        x_t = torch.randn(8, 2, 4, 4)
        same = [torch.randn(size, 2, 4, 4) for size in (4, 10, 24)]
        (layout, _), _ = optimal_spread(x_t, alpha_bar, same)
        (control, _), _ = optimal_spread(x_t, alpha_bar, shuffled_pools(same, seed=seed))
        differences.append(layout**2 - control**2)
    differences = torch.tensor(differences)
    assert differences.mean().abs() < 4 * differences.std() / len(differences) ** 0.5
    x_t = torch.randn(8, 2, 4, 4)
    pattern = torch.randn(1, 2, 4, 4)
    pattern = pattern - pattern.mean(dim=(-2, -1), keepdim=True)  # a composition, no colour
    differ = [torch.randn(20, 2, 4, 4) + sign * pattern for sign in (-1, 0, 1)]
    (layout, _), _ = optimal_spread(x_t, alpha_bar, differ)
    (control, _), _ = optimal_spread(x_t, alpha_bar, shuffled_pools(differ, seed=0))
    assert layout > 2 * control


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cond"), context_dim=384)


def test_command_measures_a_model_and_a_model_blind_to_captions_scores_zero(tmp_path, capsys, image_folder,
                                                                           conditional_checkpoint):
    argv = ["--model", str(conditional_checkpoint), "--data", str(image_folder), "--caption_template",
            "a {style} painting", "--pool_size", "4", "--probes", "3", "--timesteps", "900", "100",
            "--grid_seeds", "2", "--steps", "3", "--guidance_interval", "0.5", "inf", "--guidance_high", "4", "2",
            "--device", "cpu", "--out", str(tmp_path / "r.json")]
    assert caption_use.main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["captions"] == ["a Baroque painting", "a Expressionism painting", "a Impressionism painting"]
    out = capsys.readouterr().out
    assert [r["t"] for r in result["rows"]] == [900, 100] and "shuffled" in out and "3 captions x 2 seeds" in out
    for r in result["rows"]:
        assert r["model_layout"] > 0 and r["optimal_layout"] > 0 and 1 <= r["pool_images"] <= 4
        assert r["shuffled_layout"] > 0 and r["explained_layout"] == pytest.approx(
            max(r["optimal_layout"] ** 2 - r["shuffled_layout"] ** 2, 0) ** 0.5)
    grid = result["grid"]
    assert grid["seeds"] == 2 and grid["sampling"]["steps"] == 3
    assert grid["sampling"]["guidance_interval"] == [0.5, float("inf")] and grid["sampling"]["guidance_high"] == [4, 2]
    assert "4.0 above sigma 2.0" in out
    assert grid["layout_across_captions"] > 0 and grid["layout_across_seeds"] > 0
    assert grid["ratio"] == pytest.approx(grid["layout_across_captions"] / grid["layout_across_seeds"])
    # the same model with its cross-attention outputs zeroed ignores the caption: spread 0 at every level
    pipeline = load_diffusion_model(conditional_checkpoint, "cpu")
    with torch.no_grad():
        for name, p in pipeline.unet.named_parameters():
            if "cross_attn.to_out" in name:
                p.zero_()
    probes = torch.randn(3, 4, 8, 8)
    pools = {f"a {s} painting": torch.randn(4, 4, 8, 8) for s in ("Baroque", "Impressionism")}
    blind = caption_use.measure(pipeline, pools, probes, [900, 100])
    assert all(r["model_layout"] == pytest.approx(0, abs=1e-6) for r in blind)
    assert all(r["optimal_layout"] > 0 for r in blind)
    # and its grid repeats one composition per seed in every row, while the seeds still differ
    across_captions, across_seeds = caption_use.grid_spread(pipeline, list(pools), 2, steps=3)
    assert across_captions == pytest.approx(0, abs=1e-6) and across_seeds > 0.1


def test_bad_input_is_a_one_line_error(tmp_path, image_folder, conditional_checkpoint):
    base = ["--data", str(image_folder), "--device", "cpu"]
    with pytest.raises(UserError, match="unconditional"):
        caption_use.main(["--model", str(write_checkpoint(tmp_path)), "--caption_template", "a {style} painting"]
                         + base)
    one_style = tmp_path / "one_style"
    one_style.mkdir()
    for i in range(3):
        make_painting(i).save(one_style / f"{i}.png")
    (one_style / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "style": "Baroque"}) + "\n" for i in range(3)))
    with pytest.raises(UserError, match="gives 1 distinct captions; this measure needs 2 to"):
        caption_use.main(["--model", str(conditional_checkpoint), "--caption_template", "a {style} painting",
                          "--data", str(one_style), "--device", "cpu"])
    for bad in ("-1", "1"):
        with pytest.raises(UserError, match=r"--grid_seeds must be 0 \(no grid measure\) or at least 2"):
            caption_use.main(["--model", str(conditional_checkpoint), "--caption_template", "a {style} painting",
                              "--grid_seeds", bad] + base)
    with pytest.raises(UserError, match="--timesteps must lie in"):
        caption_use.main(["--model", str(conditional_checkpoint), "--caption_template", "a {style} painting",
                          "--timesteps", "1000"] + base)
