"""The image-embedding path on tiny models: image_embedding.py embeds a folder (whitened PCA of Lite2 features),
trainer.py --image_embeddings conditions a UNet on them (starting, from --init_from, exactly where the plain model
was), and diffusion.py --like draws variations and blends; bad input is one clear line."""
import json
import shlex

import pytest
import torch
from PIL import Image

import diffusion
import image_embedding
import trainer
import unet_training
from checkpoints import checkpoint_path, load_state_dir
from cli import UserError
from conftest import write_image_folder
from diffusion import load_diffusion_model
from samplers import guided_model_fn
from vqgan import CONFIGS, VQModel, save_vqgan

FAST = ["--unet_size", "tiny", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--no-bf16",
        "--lr", "1e-3", "--warmup_steps", "0", "--sample_every", "0", "--log_every", "1", "--save_every", "1000"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(image folder of 12 paintings, its embedding folder at 4 dimensions, a tiny VQGAN)."""
    root = tmp_path_factory.mktemp("embedded")
    folder = write_image_folder(root / "images", ["Baroque", "Cubism"])
    image_embedding.main(["--data", str(folder), "--out", str(root / "embeddings"), "--resolution", "32", "--dim",
                          "4", "--batch_size", "6"])
    torch.manual_seed(0)
    save_vqgan(VQModel(CONFIGS["vq-f4-tiny"]), root / "vqgan")
    return folder, root / "embeddings", root / "vqgan"


def train(data, vqgan, out, *flags):
    return trainer.main(["--dataset_path", str(data), "--vqgan_ckpt", str(vqgan), "--output_dir", str(out), *FAST,
                         *map(str, flags)])


def test_embeddings_are_whitened_per_painting(embedded):
    folder, embeddings, _ = embedded
    embeds, captions = image_embedding.load_embedding_cache(embeddings / "cache")
    assert embeds.shape == (12, 4) and captions[:2] == ["a Baroque painting", "a Cubism painting"]
    # the PCA was fitted on these 12 paintings: zero mean, unit variance, uncorrelated (float16 storage)
    assert torch.allclose(embeds.mean(0), torch.zeros(4), atol=2e-3)
    assert torch.allclose(torch.cov(embeds.T), torch.eye(4), atol=2e-2)
    embedder = image_embedding.load_embedder(embeddings / "embedder")
    again = embedder(diffusion.load_image(folder / "00000003.png", 32))  # what the embedder gives the same crop
    assert torch.allclose(again[0], embeds[3], atol=2e-2)
    again_path = embeddings.parent / "again"  # embedding with a given embedder reproduces its cache
    image_embedding.main(["--data", str(folder), "--out", str(again_path), "--resolution", "32", "--embedder",
                          str(embeddings / "embedder")])
    assert torch.allclose(image_embedding.load_embedding_cache(again_path / "cache")[0], embeds, atol=2e-3)
    mirrored = embedder(diffusion.load_image(folder / "00000003.png", 32).flip(-1))[0]
    assert (mirrored - embeds[3]).norm() < min((embeds[3] - other).norm() for other in embeds[4:])


def test_a_model_grown_an_embedding_starts_where_it_was_and_learns_to_use_it(tmp_path, embedded):
    folder, embeddings, vqgan = embedded
    cache = ["--latent_cache", tmp_path / "latents"]
    assert train(folder, vqgan, tmp_path / "plain", "--max_steps", 2, *cache) == 0
    init = ["--init_from", tmp_path / "plain" / "unet", "--image_embeddings", embeddings, *cache]
    grown = unet_training.make_unet("tiny", 4, 8, None, image_embed_dim=4).eval()
    new, _ = unet_training.init_from_checkpoint(grown, tmp_path / "plain" / "unet")
    assert sorted(new) == ["image_embed_proj.bias", "image_embed_proj.weight", "null_image_embed"]
    plain = load_diffusion_model(tmp_path / "plain" / "unet").unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(grown(x, t, image_embed=torch.randn(2, 4)), plain(x, t), atol=1e-6)  # layouts differ

    assert train(folder, vqgan, tmp_path / "grown", "--max_steps", 6, "--lr", "1e-2", *init) == 0
    pipeline = load_diffusion_model(tmp_path / "grown" / "unet", use_ema=False)  # six steps barely move the EMA
    assert pipeline.unet.image_embed_dim == 4 and pipeline.config["image_embedder"].endswith("embedder")
    with torch.no_grad():
        a, b = (pipeline.unet(x, t, image_embed=e) for e in (torch.zeros(2, 4), 3 * torch.ones(2, 4)))
    assert (a - b).abs().mean() > 0.01 * a.abs().mean()  # trained: the embedding now moves the prediction
    with pytest.raises(UserError, match="holds 12 images, the latent cache 6"):
        train(folder, vqgan, tmp_path / "fewer", "--max_steps", 1, "--max_images", 6,
              "--latent_cache", tmp_path / "latents6", "--image_embeddings", embeddings)


def test_the_embedding_projection_learns_at_its_own_rate_and_keeps_it_on_resume(tmp_path, embedded):
    folder, embeddings, vqgan = embedded
    flags = ["--image_embeddings", embeddings, "--latent_cache", tmp_path / "latents", "--lr", "1e-3"]
    moved = {}
    for scale in (1, 10):
        out = tmp_path / f"scale{scale}"
        assert train(folder, vqgan, out, "--max_steps", 1, "--image_embed_lr_scale", scale, *flags) == 0
        weights = load_diffusion_model(out / "unet", use_ema=False).unet.state_dict()
        moved[scale] = {name: weights[name].abs().mean().item()  # from zero, and the first Adam step is lr x sign
                        for name in ("image_embed_proj.weight", "conv_in.weight")}
    assert moved[10]["image_embed_proj.weight"] == pytest.approx(10 * moved[1]["image_embed_proj.weight"], rel=0.05)
    assert moved[10]["conv_in.weight"] == pytest.approx(moved[1]["conv_in.weight"], rel=1e-3)

    out = tmp_path / "resumed"
    resumed = ["--image_embed_lr_scale", 10, "--save_every", 1, "--lr_schedule", "constant", *flags]
    assert train(folder, vqgan, out, "--max_steps", 1, *resumed) == 0
    assert train(folder, vqgan, out, "--max_steps", 2, "--resume", "auto", *resumed) == 0
    groups = load_state_dir(checkpoint_path(out / "checkpoints", 2))["optimizer"]["param_groups"]
    assert sorted({group["lr"] for group in groups}) == pytest.approx([1e-3, 1e-2])
    with pytest.raises(UserError, match="image_embed_lr_scale"):
        train(folder, vqgan, out, "--max_steps", 3, "--resume", "auto", *resumed[:1], 5, *resumed[2:])


def test_embedding_guidance_pushes_away_from_the_null_embedding():
    """With image embeddings, the unconditional branch gets the null embedding: out = uncond + s (cond - uncond)."""
    torch.manual_seed(0)
    unet = diffusion.UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                          num_heads=2, sample_size=8, image_embed_dim=4).eval()
    with torch.no_grad():  # the zero-initialised layers (output convolutions, the projection) would hide the embedding
        for parameter in unet.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, t, embed = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 4)
    null = unet.null_image_embed.detach().expand_as(embed)
    with torch.no_grad():
        cond, uncond = unet(x, t, image_embed=embed), unet(x, t, image_embed=null)
        guided = guided_model_fn(unet, guidance_scale=2.5, image_embed=embed, uncond_image_embed=null)(x, t)
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)


@pytest.fixture(scope="module")
def like_model(tmp_path_factory, embedded):
    folder, embeddings, vqgan = embedded
    out = tmp_path_factory.mktemp("like")
    assert train(folder, vqgan, out / "run", "--max_steps", 2, "--image_embeddings", embeddings) == 0
    tensors, config = diffusion.read_diffusion_model(out / "run" / "unet")
    torch.manual_seed(0)  # two steps leave the zero-initialised projection near zero: give the embedding a say
    tensors = {k: v + 0.3 * torch.randn_like(v) if "image_embed_proj" in k or "conv_out" in k else v
               for k, v in tensors.items() if k.startswith("ema.")}
    diffusion.save_diffusion_model(out / "like", {}, {k[4:]: v for k, v in tensors.items()}, config, vqgan=vqgan,
                                   image_embedder=embeddings / "embedder")
    return out / "like"


def pixels(path):
    with Image.open(path) as img:
        return torch.tensor(list(img.convert("RGB").getdata()), dtype=torch.float32)


def test_like_draws_variations_and_a_blend_recorded_in_the_png(tmp_path, embedded, like_model):
    folder, _, _ = embedded
    a, b = folder / "00000001.png", folder / "00000002.png"
    run = ["--unet_ckpt_path", str(like_model), "--num_images", "2", "--steps", "3", "--precision", "fp32"]
    assert diffusion.main([*run, "--like", str(a), "--outdir", str(tmp_path / "a")]) == 0
    assert diffusion.main([*run, "--like", str(b), "--outdir", str(tmp_path / "b")]) == 0
    assert diffusion.main([*run, "--like", str(a), "--like", str(b), "--mix", "0", "--outdir",
                           str(tmp_path / "mix0")]) == 0
    assert diffusion.main([*run, "--like", str(a), "--like", str(b), "--mix", "0.3", "--outdir",
                           str(tmp_path / "mix")]) == 0
    with Image.open(tmp_path / "mix" / "00001.png") as img:
        params, command = json.loads(img.text["parameters"]), img.text["command"]
    assert params["like"] == [str(a), str(b)] and params["mix"] == 0.3 and "--mix 0.3" in command
    assert f"--like {a} --like {b}" in command and "--seed 1 " in command
    # a blend at 0 is the first painting's variation; the two paintings' variations differ
    assert torch.allclose(pixels(tmp_path / "mix0" / "00000.png"), pixels(tmp_path / "a" / "00000.png"), atol=1)
    assert not torch.equal(pixels(tmp_path / "a" / "00000.png"), pixels(tmp_path / "b" / "00000.png"))
    redo = shlex.split(command)[2:]  # the recorded command, less "python diffusion.py", redraws the picture alone
    assert diffusion.main([*redo, "--outdir", str(tmp_path / "redo")]) == 0
    redone, drawn = pixels(tmp_path / "redo" / "00000.png"), pixels(tmp_path / "mix" / "00001.png")
    assert (redone - drawn).abs().max() <= 1  # alone or in a batch of 2: convolution rounding only


def test_like_starts_from_the_painting_noised_to_its_strength(tmp_path, embedded, like_model):
    """Below strength 1 a variation starts from its painting (SDEdit) under the painting's embedding; a blend from
    the two paintings' cross-fade; at strength 1 from pure noise, the embedding alone."""
    folder, _, _ = embedded
    a, b = folder / "00000001.png", folder / "00000002.png"
    run = ["--unet_ckpt_path", str(like_model), "--num_images", "2", "--steps", "4", "--precision", "fp32"]

    def draw(name, *flags):
        assert diffusion.main([*run, *map(str, flags), "--outdir", str(tmp_path / name)]) == 0
        return pixels(tmp_path / name / "00000.png")

    default = draw("default", "--like", a)
    assert torch.equal(default, draw("started", "--like", a, "--init_image", a, "--strength", diffusion.LIKE_STRENGTH))
    assert not torch.equal(default, draw("from_b", "--like", a, "--init_image", b, "--strength",
                                         diffusion.LIKE_STRENGTH))
    assert not torch.equal(default, draw("noise", "--like", a, "--strength", 1))
    with Image.open(tmp_path / "default" / "00000.png") as img:
        assert f"--strength {diffusion.LIKE_STRENGTH}" in img.text["command"]
        assert json.loads(img.text["parameters"])["strength"] == diffusion.LIKE_STRENGTH
    image_a, image_b = diffusion.load_image(a, 32), diffusion.load_image(b, 32)
    crossfade = diffusion.like_start(torch.cat([image_a, image_b]), 0.25)
    assert torch.allclose(crossfade, 0.75 * image_a + 0.25 * image_b)


@pytest.mark.parametrize("flags,message", [
    (["--like", "{text}"], "cannot read --like image"),
    (["--like", "{a}", "--strength", "0"], r"--strength must be in \(0, 1\], got 0"),
    (["--like", "{a}", "--like", "{a}", "--mix", "1.5"], r"--mix must be in \[0, 1\], got 1.5"),
    (["--like", "{a}", "--mix", "0.5"], "--mix needs two --like paintings"),
    (["--like", "{a}", "--like", "{a}", "--like", "{a}"], "--like takes one painting"),
])
def test_like_bad_input_is_one_clear_error(tmp_path, embedded, like_model, flags, message):
    folder, _, _ = embedded
    (tmp_path / "notes.txt").write_text("not an image")
    flags = [f.format(text=tmp_path / "notes.txt", a=folder / "00000001.png") for f in flags]
    with pytest.raises(UserError, match=message) as err:
        diffusion.main(["--unet_ckpt_path", str(like_model), "--num_images", "1", "--steps", "2", *flags,
                        "--outdir", str(tmp_path / "out")])
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_like_on_a_model_without_embeddings_is_refused(tmp_path, embedded):
    folder, _, vqgan = embedded
    assert train(folder, vqgan, tmp_path / "plain", "--max_steps", 1) == 0
    with pytest.raises(UserError, match="this model takes no image embedding"):
        diffusion.main(["--unet_ckpt_path", str(tmp_path / "plain" / "unet"), "--like", str(folder / "00000001.png"),
                        "--num_images", "1", "--steps", "2", "--outdir", str(tmp_path / "out")])


class StubTextEncoder:
    """TextEncoder's interface without weights: one fixed random token per caption (seeded by its length)."""

    name, dim, max_length = "stub", 16, 1

    def encode(self, captions):
        tokens = torch.stack([torch.randn(1, self.dim, generator=torch.Generator().manual_seed(len(c)))
                              for c in captions])
        return tokens, torch.ones(len(captions), 1, dtype=torch.bool)


def test_a_prompt_goes_through_a_caption_conditioned_prior(tmp_path, like_model):
    """unCLIP's path for an embedding model without text: caption -> prior -> image embedding -> painting."""
    import prior

    torch.manual_seed(0)
    conditional = prior.EmbeddingPrior(4, width=32, depth=1, context_dim=16, text_encoder="stub")
    with torch.no_grad():
        for parameter in conditional.parameters():  # untrained, but let the caption move the embedding
            parameter.add_(0.3 * torch.randn_like(parameter))
    prior.save_prior(tmp_path / "prior", conditional)
    pipeline = load_diffusion_model(like_model, prior=tmp_path / "prior", text_encoder=StubTextEncoder())
    options = dict(steps=3, progress=False)
    short, longer = (pipeline.generate(1, 5, prompt=p, **options) for p in ("a Baroque painting", "a Cubism work"))
    assert not torch.allclose(short, longer, atol=1e-3)  # one seed, two captions: two embeddings
    assert torch.equal(pipeline.prior_embeddings(1, 5, "a Baroque painting"),
                       pipeline.prior_embeddings(1, 5, "a Baroque painting"))
    with pytest.raises(UserError, match="this embedding prior is unconditional"):
        load_diffusion_model(like_model, prior=_unconditional_prior(tmp_path)).generate(1, 0, prompt="a", **options)
    with pytest.raises(UserError, match="it has no caption-conditioned prior"):
        load_diffusion_model(like_model).generate(1, 0, prompt="a", **options)


def _unconditional_prior(tmp_path):
    import prior

    prior.save_prior(tmp_path / "unconditional", prior.EmbeddingPrior(4, width=32, depth=1))
    return tmp_path / "unconditional"


def test_like_without_a_checkpoint_uses_the_bundled_embedding_model(tmp_path, embedded, like_model, monkeypatch):
    folder, embeddings, _ = embedded
    bundled = tmp_path / "models"
    bundled.mkdir()
    image_embedding.save_embedder(image_embedding.load_embedder(embeddings / "embedder"), bundled / "embedder")
    diffusion.export_diffusion_model(like_model, bundled / "unet-like", dtype=torch.float32,
                                     image_embedder=bundled / "embedder")
    assert json.loads((bundled / "unet-like.json").read_text())["image_embedder"] == "embedder"  # shipped beside it
    monkeypatch.setattr(diffusion, "BUNDLED_MODELS", bundled)
    assert diffusion.main(["--like", str(folder / "00000001.png"), "--num_images", "1", "--steps", "2",
                           "--outdir", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "00000.png") as img:
        assert json.loads(img.text["parameters"])["checkpoint"] == "models/unet-like.json (bundled)"
    with pytest.raises(UserError, match="--like draws variations of a painting and takes no --prompt"):
        diffusion.main(["--like", str(folder / "00000001.png"), "--prompt", "a Baroque painting"])


def test_an_embedding_model_records_its_guidance_for_unprompted_samples(tmp_path, like_model):
    """Unprompted samples of an embedding model are guided against the null embedding: the regenerate command
    must carry the scale it used."""
    prior_path = _unconditional_prior(tmp_path)
    run = ["--unet_ckpt_path", str(like_model), "--num_images", "1", "--steps", "2", "--prior", str(prior_path),
           "--guidance_scale", "2.5", "--outdir", str(tmp_path / "out")]
    assert diffusion.main(run) == 0
    with Image.open(tmp_path / "out" / "00000.png") as img:
        assert "--guidance_scale 2.5" in img.text["command"] and f"--prior {prior_path}" in img.text["command"]
