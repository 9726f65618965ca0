"""UNet: shapes, sizes, zero-initialised outputs, cross-attention and the null embedding, bf16 / channels-last."""
import json

import pytest
import torch

from cli import UserError
from unet import UNET_CONFIGS, UNet, build_unet, complete_config, count_parameters, main, mean_token, timestep_embedding


def tiny(context_dim=None, **overrides):
    """The tiny size on 4x8x8 latents, with attention at 8x8 and in the middle."""
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=8, attention_resolutions=[8], context_dim=context_dim, **overrides).eval()


def randomized(model):
    """Give every parameter (the zero-initialised ones too) random values, so every path affects the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_output_shape_and_timesteps_of_any_form():
    model = randomized(tiny())
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(model(x, 7), model(x, torch.tensor([7, 7, 7])))  # a scalar t is broadcast
    fractional = model(x, torch.tensor([10.25, 10.25, 10.25]))
    assert not torch.equal(fractional, model(x, 10))  # fractional timesteps are embedded, not truncated
    wide = randomized(build_unet("tiny", sample_size=8, in_channels=3, out_channels=6).eval())
    assert wide(torch.randn(2, 3, 8, 16), 5).shape == (2, 6, 8, 16)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    assert emb[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # cos 0, sin 0
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(3.0)).item())


def test_parameter_counts_per_size():
    with torch.device("meta"):  # no memory: the base model's 100M parameters are only counted
        counts = {name: count_parameters(UNet(**config)) for name, config in UNET_CONFIGS.items()}
        tiny_cond = count_parameters(build_unet("tiny", context_dim=384))
    assert counts["tiny"] < 1e6 and tiny_cond < 1e6
    assert 10e6 < counts["small"] < 14e6
    assert counts["small"] < counts["medium"] < counts["base"]
    assert 90e6 < counts["base"] < 110e6


def test_fresh_model_predicts_zero_and_residual_branches_start_empty():
    model = tiny(context_dim=16)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(x, torch.tensor([1, 900])), torch.zeros_like(x))
    zeroed = [name for name, p in model.named_parameters() if not p.any()]
    assert "conv_out.weight" in zeroed and any(n.endswith("conv2.weight") for n in zeroed)
    assert any(n.endswith("proj_out.weight") for n in zeroed)


def test_unconditional_model_has_no_text_weights():
    names = [name for name, _ in tiny().named_parameters()]
    assert not any("cross_attn" in n or "null_context" in n for n in names)
    cond_names = [name for name, _ in tiny(context_dim=16).named_parameters()]
    assert "null_context" in cond_names and any("cross_attn" in n for n in cond_names)


def test_cross_attention_uses_the_context_and_ignores_masked_tokens():
    model = randomized(tiny(context_dim=16))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 600])
    context = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = model(x, t, context, mask)
    other = context.clone()
    other[:, 1] += 1.0
    assert (model(x, t, other, mask) - out).abs().amax((1, 2, 3)).min() > 1e-3  # real tokens change both rows
    padded = context.clone()
    padded[0, 3:] = 100.0  # row 0's masked tokens
    assert torch.allclose(model(x, t, padded, mask), out, atol=1e-6)
    assert not torch.allclose(model(x, t), out, atol=1e-3)  # no context: the null embedding


def test_drop_context_gives_the_null_embedding():
    model = randomized(tiny(context_dim=16))
    context, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    dropped, dropped_mask = model.drop_context(context, mask, torch.tensor([True, False, True]))
    assert torch.equal(dropped[1], context[1]) and torch.equal(dropped_mask[1], mask[1])
    assert dropped_mask[0].tolist() == [True, False, False, False, False]
    assert torch.equal(dropped[0, 0], model.null_context[0].detach())
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 5, 5])
    # a dropped row is exactly the unconditional prediction (context=None: the null token alone)
    assert torch.allclose(model(x, t, dropped, dropped_mask)[[0, 2]], model(x, t)[[0, 2]], atol=1e-6)
    # the null embedding is learned
    dropped.sum().backward()
    assert model.null_context.grad is not None and model.null_context.grad.abs().sum() > 0


def test_pooled_text_embed_starts_as_the_model_without_it_then_follows_the_caption():
    plain = randomized(tiny(context_dim=16))
    pooled = tiny(context_dim=16, pooled_text_embed=True)
    missing = pooled.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["pooled_text_proj.weight", "pooled_text_proj.bias"]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([50, 500, 950])
    context = torch.randn(3, 5, 16)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5, [True] * 5])
    assert torch.equal(pooled(x, t, context, mask), plain(x, t, context, mask))  # the projection starts at zero
    with torch.no_grad():
        pooled.pooled_text_proj.weight.normal_(0, 0.5)
    out = pooled(x, t, context, mask)
    assert (out - plain(x, t, context, mask)).abs().amax((1, 2, 3)).min() > 1e-3
    padded = context.clone()
    padded[0, 2:] = 100.0  # row 0's masked tokens: neither the mean nor the attention sees them
    assert torch.allclose(pooled(x, t, padded, mask), out, atol=1e-5)
    dropped, dropped_mask = pooled.drop_context(context, mask, torch.tensor([True, False, True]))
    assert torch.allclose(pooled(x, t, dropped, dropped_mask)[[0, 2]], pooled(x, t)[[0, 2]], atol=1e-5)
    with pytest.raises(ValueError, match="pooled_text_embed needs a text-conditioned UNet"):
        tiny(pooled_text_embed=True)


def test_mean_token_averages_the_real_tokens():
    context = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert mean_token(context, mask).tolist() == [[0, 1], [8, 9]]
    assert mean_token(context).tolist() == [[2, 3], [8, 9]]


def test_a_config_saved_before_an_option_existed_takes_its_default():
    config = json.loads(json.dumps(tiny(context_dim=16).config))
    del config["pooled_text_embed"]  # as saved before the option existed
    assert UNet(**config).config == complete_config(config) == tiny(context_dim=16).config


def test_config_rebuilds_the_model():
    model = tiny(context_dim=16, dropout=0.1, pooled_text_embed=True)
    config = json.loads(json.dumps(model.config))
    rebuilt = UNet(**config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_bf16_autocast_and_channels_last_forward():
    model = randomized(tiny(context_dim=16))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    context, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    reference = model(x, t, context, mask)
    model = model.to(memory_format=torch.channels_last)
    channels_last = model(x.contiguous(memory_format=torch.channels_last), t, context, mask)
    assert torch.allclose(channels_last, reference, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x.contiguous(memory_format=torch.channels_last), t, context, mask)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - reference).norm() / reference.norm() < 0.05


def test_training_fits_targets_that_need_the_timestep_and_the_text():
    """Four rows with one x that differ only in t (10 or 600) and caption (A or B); the target's first two channels
    are +-1 by t, its last two +-1 by caption. A model blind to t, or to the text, sees pairs of rows with opposite
    targets as one and cannot go below a loss of 0.5; the UNet, trained on these rows, must get far below it."""
    model = tiny(context_dim=16).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1)
    t = torch.tensor([10, 600, 10, 600])
    context, mask = torch.randn(2, 3, 16)[[0, 0, 1, 1]], torch.ones(4, 3, dtype=torch.bool)  # captions A A B B
    by_t, by_text = torch.tensor([1.0, -1, 1, -1]), torch.tensor([1.0, 1, -1, -1])
    target = torch.stack([by_t, by_t, by_text, by_text], 1)[:, :, None, None].expand(4, 4, 8, 8)
    for _ in range(40):
        loss = (model(x, t, context, mask) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # about 0.015 after these 40 steps


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(model_channels=48)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(model_channels=32, channel_mult=[1], num_heads=5)


def test_cli_prints_parameter_count(capsys):
    assert main(["--size", "tiny"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        count = count_parameters(build_unet("tiny"))
    assert f"{count:,} parameters" in out and "UNet tiny" in out
    assert main(["--size", "small", "--context_dim", "384"]) == 0
    plain = capsys.readouterr().out
    assert "UNet small" in plain
    assert main(["--size", "small", "--context_dim", "384", "--pooled_text_embed"]) == 0
    pooled = capsys.readouterr().out
    count = lambda out: int(out.split(": ")[-1].split()[0].replace(",", ""))  # noqa: E731
    assert count(pooled) - count(plain) == 384 * 256 + 256  # the projection onto the 4 x 64 timestep embedding
    with pytest.raises(UserError, match="--pooled_text_embed needs --context_dim"):
        main(["--pooled_text_embed"])


def test_feature_layer_returns_a_stage_output_and_leaves_the_prediction_alone():
    """forward(..., feature_layer=NAME) adds the named stage's output (for REPA) and changes nothing else; every
    stage's shape is in feature_shapes; the small UNet's middle is 128 x 4 x 4 on 32 x 32 latents."""
    model = randomized(tiny())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    plain = model(x, t)
    assert list(model.feature_shapes) == ["down.0", "down.1", "down.2", "middle", "up.0", "up.1", "up.2", "up.3"]
    features = {}
    for layer, (channels, size) in model.feature_shapes.items():
        out, features[layer] = model(x, t, feature_layer=layer)
        assert torch.equal(out, plain) and features[layer].shape == (2, channels, size, size)
    assert model.feature_shapes["middle"] == (32, 4) and model.feature_shapes["up.3"] == (32, 8)
    assert not torch.equal(features["down.1"], features["up.2"])
    captured = {}
    model.middle.register_forward_hook(lambda module, inputs, output: captured.update(middle=output))
    model(x, t)
    assert torch.equal(captured["middle"], features["middle"])  # what the middle stage really computed
    with pytest.raises(ValueError, match="no UNet stage 'mid' \\(choose from down.0, "):
        model(x, t, feature_layer="mid")
    with torch.device("meta"):
        assert build_unet("small").feature_shapes["middle"] == (128, 4)
