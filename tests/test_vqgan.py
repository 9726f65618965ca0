"""VQGAN: architecture matches the published checkpoints, save/load round-trips, training CLI."""
import pytest
import torch

from common import UserError
from vqgan import CONFIGS, VQModel, load_vqgan, save_vqgan


def test_tiny_config_is_small_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VQModel(CONFIGS["vq-f4-tiny"]).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    model.latent_scale = 0.5
    save_vqgan(model, tmp_path / "vq")
    loaded = load_vqgan(tmp_path / "vq", "cpu")
    assert loaded.latent_scale == 0.5 and loaded.config == model.config and not loaded.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images)
        assert latents.shape == (2, 4, 8, 8) and model.downsample_factor == 4
        assert torch.equal(loaded.encode(images), latents)
        assert torch.equal(loaded.decode(latents), model.decode(latents))


def test_load_vqgan_rejects_wrong_model_file(tmp_path):
    from common import save_model

    save_model(tmp_path / "unet", {"w": torch.zeros(1)}, {"model": "noise2art-unet"})
    with pytest.raises(UserError, match="not a VQGAN"):
        load_vqgan(tmp_path / "unet")
