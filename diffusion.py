"""A trained latent-diffusion model and the sampling command: the Pipeline (UNet, noise schedule and VQGAN, with
the text encoder, image embedder and prior a model may take), its checkpoint format, and `python diffusion.py`.
The maths is in schedule.py (the forward process) and samplers.py (the samplers and guidance).

    python diffusion.py --unet_ckpt_path runs/unet/unet --num_images 16 --sampler dpmpp-2m --steps 20
    python diffusion.py --prompt "an Impressionism painting of a harbour" --guidance_scale 5
    python diffusion.py --init_image photo.png --strength 0.6     # img2img (SDEdit)
    python diffusion.py --interpolate --num_images 8              # slerp from the noise of --seed to --seed + 1
"""
import argparse
import dataclasses
import os
import re
import shlex
from pathlib import Path

import torch
from PIL import Image

from checkpoints import EXPORT_DTYPES, load_model, load_weights, model_paths, save_model
from cli import ArgumentParser, UserError, check_output_folder, non_negative_float, positive_int, run_cli
from devices import autocast, native_bf16, pick_device
from images import GRID_NAME, image_to_tensor, make_grid, save_png, tensor_to_images
from samplers import (
    DEFAULT_GUIDANCE_INTERVAL, DEFAULT_GUIDANCE_SCALE, DEFAULT_KARRAS, DEFAULT_STEPS, SAMPLERS, guidance_scales,
    guided_model_fn, img2img_timesteps, make_denoiser, randn, sampling_timesteps, slerp,
)
from schedule import NoiseSchedule, check_prediction_type
from unet import UNet
from vqgan import VQModel, load_vqgan

BUNDLED_MODELS = Path(__file__).resolve().parent / "models"
# diffusion.py without --prompt: 10 Karras-spaced dpmpp-2m steps score within the FD noise of 20 on 1,000 samples of
# the bundled unconditional model in half the time; guided sampling loses at 10 (docs/sampler-steps.md), and
# evaluate.py and caption_use.py measure at DEFAULT_STEPS.
UNPROMPTED_STEPS = {**DEFAULT_STEPS, "dpmpp-2m": 10}
# --like's start: the painting noised to timestep 0.8 (T - 1). From pure noise the bundled embedding model's variations
# are no closer to their source than to other paintings (docs/embedding-prior.md, experiments/variation_strength.py)
LIKE_STRENGTH = 0.8


# ----------------------------------------------------------------------------------------------
# A trained model: UNet + schedule + VQGAN (+ text encoder)


class Pipeline:
    """Sampling from a UNet (in eval mode), its noise schedule and VQGAN, on the UNet's device. `config` is the
    checkpoint JSON; only "prediction_type" is required ("latent_shape", "latent_scale", "text_encoder" and
    "max_text_length" default to the UNet's, the VQGAN's and the default encoder)."""

    def __init__(self, unet, schedule, vqgan, config, text_encoder=None, bf16=False, channels_last=True,
                 compile=False, image_embedder=None, prior=None):
        check_prediction_type(config["prediction_type"])
        self.unet, self.schedule, self.vqgan, self.config = unet, schedule, vqgan, config
        self.prediction_type = config["prediction_type"]
        unet_config = unet.config
        self.latent_shape = tuple(config.get("latent_shape") or
                                  (unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"]))
        self.latent_scale = float(config.get("latent_scale") or vqgan.latent_scale)
        self.conditional = unet.context_dim is not None
        self.device = next(unet.parameters()).device
        self.bf16 = bf16
        self.channels_last = channels_last
        # channels-last: faster convolutions (CPU: UNet ~10%, decoder ~25%), the same outputs to about 1e-5
        layout = torch.channels_last if channels_last else torch.contiguous_format
        unet.to(memory_format=layout)
        vqgan.to(memory_format=layout)
        self.unet_forward = torch.compile(unet) if compile else unet
        self._text_encoder = text_encoder
        self._image_embedder = image_embedder  # an ImageEmbedder, or its path (loaded on first use)
        self._prior = prior  # a prior.py EmbeddingPrior, or its path (loaded on first use), or None

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder

            self._text_encoder = TextEncoder(self.config.get("text_encoder") or DEFAULT_TEXT_ENCODER, self.device,
                                             max_length=self.config.get("max_text_length", 32))
        return self._text_encoder

    @property
    def image_embedder(self):
        if self.unet.image_embed_dim is None:
            raise UserError("this model takes no image embedding (--like): train one with trainer.py "
                            "--image_embeddings")
        if self._image_embedder is None:
            raise UserError("this model names no image embedder (image_embedding.py) in its config")
        if not isinstance(self._image_embedder, torch.nn.Module):
            from image_embedding import load_embedder

            self._image_embedder = load_embedder(self._image_embedder, self.device)
        return self._image_embedder

    @torch.no_grad()
    def prior_embeddings(self, num_images, seed, prompt=None):
        """num_images x E embeddings from the model's prior, row i from seed + i (so an image is redone alone), or
        None where the model takes no embedding or has no prior (its unconditional mode, the null embedding).
        prompt: a caption for a caption-conditioned prior (unCLIP's path: caption -> prior -> embedding -> image)."""
        if self.unet.image_embed_dim is None or self._prior is None:
            return None
        from prior import load_prior, sample_embeddings

        if not isinstance(self._prior, torch.nn.Module):
            self._prior = load_prior(self._prior, self.device)
        return sample_embeddings(self._prior, num_images, seed, captions=prompt,
                                 text_encoder=None if prompt is None else self.text_encoder)

    def image_embed_branches(self, image_embeds, num_images):
        """guided_model_fn's image_embed and uncond_image_embed: the given embeddings against the null one."""
        if image_embeds is None:
            return {}
        if self.unet.image_embed_dim is None:
            raise UserError("this model takes no image embedding (--like): train one with trainer.py "
                            "--image_embeddings")
        if tuple(image_embeds.shape) != (num_images, self.unet.image_embed_dim):
            raise UserError(f"image embeddings must be {num_images} x {self.unet.image_embed_dim}, got "
                            f"{tuple(image_embeds.shape)}")
        embeds = image_embeds.to(self.device).float()
        return {"image_embed": embeds, "uncond_image_embed": self.unet.null_image_embed.detach().expand_as(embeds)}

    @torch.no_grad()
    def embed_images(self, images):
        """Images B x 3 x H x W in [-1, 1] -> the image embeddings B x E this model is conditioned on."""
        return self.image_embedder(images.to(self.device)).float()

    def contexts(self, num_images, prompt=None, negative_prompt=None):
        """(context, mask, uncond_context, uncond_mask) for guided_model_fn. No prompt: the null embedding alone;
        the uncond branch gets the null embedding, or the negative prompt where one is given."""
        if not self.conditional:
            if prompt is not None or negative_prompt is not None:
                raise UserError("this model is unconditional: it takes no --prompt or --negative_prompt")
            return None, None, None, None
        if prompt is None:
            if negative_prompt is not None:
                raise UserError("--negative_prompt needs a --prompt")
            return None, None, None, None
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        context, mask = self.text_encoder.encode(prompts)
        if negative_prompt is not None:
            uncond, uncond_mask = self.text_encoder.encode([negative_prompt] * num_images)
        else:
            uncond, uncond_mask = self.unet.drop_context(context, mask, torch.ones(num_images, dtype=torch.bool,
                                                                                    device=self.device))
        return context, mask, uncond, uncond_mask

    @torch.no_grad()
    def encode(self, images):
        """Images B x 3 x H x W in [-1, 1] -> scaled latents, the space diffusion runs in."""
        with autocast(self.device, self.bf16):
            return self.vqgan.encode(images.to(self.device)).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> images B x 3 x H x W in [-1, 1]."""
        with autocast(self.device, self.bf16):
            return self.vqgan.decode(latents / self.latent_scale).float().clamp(-1, 1)

    @torch.no_grad()
    def sample_latents(self, num_images=1, seed=0, sampler="dpmpp-2m", steps=20, prompt=None, negative_prompt=None,
                       guidance_scale=DEFAULT_GUIDANCE_SCALE, guidance_interval=DEFAULT_GUIDANCE_INTERVAL,
                       guidance_high=None, eta=0.0, karras=None, lower_order_final=False, init_images=None,
                       strength=None, noise=None, image_embeds=None, progress=True):
        """Scaled latents of `num_images` samples; image i draws all its noise from torch.Generator(seed + i).
        karras: Karras et al. spacing of the steps (else even in t; None: the sampler's own, DEFAULT_KARRAS, and
        even for a schedule with zero terminal SNR); lower_order_final: dpmpp-2m's first-order step
        into the last timestep; guidance_interval (low, high): guide only where low < sigma <= high (None: everywhere);
        guidance_high (scale, sigma): that scale instead where the noise level is above sigma (None: one scale).
        init_images (B x 3 x H x W) + strength in (0, 1]: SDEdit img2img (Meng et al. 2022), noised to the noise
        level of timestep round(strength * (T - 1)), the same for every sampler and spacing, and denoised from there
        in max(1, round(strength * steps)) steps of the sampler's spacing. `noise` replaces the start noise.
        image_embeds (num_images x E): what an embedding-conditioned model draws (embed_images), guided against its
        null embedding; None: its prior's samples (prior_embeddings; for a model without text, under `prompt` when
        its prior is caption-conditioned), or without a prior its unconditional mode."""
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r} (choose {', '.join(SAMPLERS)})")
        if eta and sampler != "ddim":
            raise UserError("--eta applies to the ddim sampler only")
        if lower_order_final and sampler != "dpmpp-2m":
            raise UserError("--lower_order_final applies to the dpmpp-2m sampler only")
        if guidance_scale < 0 or (guidance_high is not None and min(guidance_high) < 0):
            raise UserError(f"guidance scales and noise levels must be at least 0, got {guidance_scale} and "
                            f"{guidance_high}")
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        if noise is None:
            noise = randn((num_images, *self.latent_shape), generators)
        noise = noise.to(self.device)
        if karras is None:
            karras = DEFAULT_KARRAS[sampler] and self.schedule.alphas_cumprod[-1] > 0
        if init_images is None:
            timesteps = sampling_timesteps(self.schedule, steps, karras)
            latents = noise
        else:
            timesteps = img2img_timesteps(self.schedule, steps, karras, strength)
            latents = self.schedule.q_sample(self.encode(init_images), timesteps[:1].expand(num_images), noise)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if self.conditional or self.unet.image_embed_dim is None or image_embeds is not None:
            prompt_to_unet = prompt
        else:  # an embedding model without text: a prompt goes through its prior
            image_embeds, prompt_to_unet = self.prior_embeddings(num_images, seed, prompt), None
            if prompt is not None and image_embeds is None:
                raise UserError("this model takes no --prompt: it has no caption-conditioned prior (prior.py "
                                "--conditional) to turn one into an image embedding")
        model_fn = guided_model_fn(self.unet_forward, *self.contexts(num_images, prompt_to_unet, negative_prompt),
                                   guidance_scale=guidance_scales(self.schedule, guidance_scale, guidance_interval,
                                                                  guidance_high),
                                   **self.image_embed_branches(image_embeds, num_images))

        def model_fn_autocast(x, t):
            with autocast(self.device, self.bf16):
                return model_fn(x, t).float()

        denoiser = make_denoiser(model_fn_autocast, self.schedule, self.prediction_type)
        options = {"ddim": {"eta": eta}, "dpmpp-2m": {"lower_order_final": lower_order_final}}.get(sampler, {})
        return SAMPLERS[sampler](denoiser, latents, self.schedule, timesteps, generators, progress, **options)

    def generate(self, num_images=1, seed=0, **options):
        """Images B x 3 x H x W in [-1, 1]; options as for sample_latents."""
        return self.decode(self.sample_latents(num_images, seed, **options))


# ----------------------------------------------------------------------------------------------
# Checkpoints: NAME.safetensors ("model.*", "ema.*", optionally "vqgan.*") + NAME.json (see DEVELOPERS.md)


def save_diffusion_model(path, model_state, ema_state, config, vqgan=None, dtype=None, image_embedder=None,
                         prior=None):
    """Write a self-describing diffusion checkpoint. `config` is the JSON of DEVELOPERS.md ("unet", "schedule",
    "prediction_type", "latent_shape", "latent_scale", "text_encoder", "max_text_length", "training").
    `vqgan`: a path to a VQGAN checkpoint (stored relative to the checkpoint's folder), or a VQModel whose
    weights are embedded under "vqgan.*"; None keeps config["vqgan"] as it is. `image_embedder`: the path of the
    image_embedding.py embedder an embedding-conditioned UNet reads, `prior` that of the prior.py model its
    samples draw their embeddings from (both stored relative like the VQGAN's). `dtype` (e.g. torch.float16) is
    for storage only: loading gives fp32."""
    config = {**config, "model": "noise2art-unet"}
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in (ema_state or {}).items()})
    if isinstance(vqgan, VQModel):
        tensors.update({f"vqgan.{k}": v for k, v in vqgan.state_dict().items()})
        config.update(vqgan=None, vqgan_config=vqgan.config)
    elif vqgan is not None:
        config["vqgan"] = relative_reference(vqgan, path)
    for key, target in (("image_embedder", image_embedder), ("prior", prior)):
        if target is not None:
            config[key] = relative_reference(target, path)
    return save_model(path, tensors, config, dtype=dtype)


def relative_reference(target, checkpoint):
    """Model file `target` as a path relative to the folder of `checkpoint` (what a checkpoint stores)."""
    return os.path.relpath(model_paths(target)[0].resolve().with_suffix(""), Path(checkpoint).resolve().parent)


def _weights(tensors, prefix):
    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in tensors.items() if k.startswith(prefix)}


def unet_weights(tensors, path, use_ema=True):
    """(UNet weights in fp32, "ema" or "model"): a checkpoint's EMA weights where it has them and `use_ema`, else
    its raw ones."""
    has_raw, has_ema = (any(k.startswith(p) for k in tensors) for p in ("model.", "ema."))
    if not use_ema and not has_raw:
        raise UserError(f"{path} holds only EMA weights (a sampling export): drop --no_ema")
    prefix = "ema." if has_ema and (use_ema or not has_raw) else "model."
    return _weights(tensors, prefix), prefix[:-1]


def read_diffusion_model(path):
    """(tensors, config) of a checkpoint written by save_diffusion_model; anything else is a UserError."""
    tensors, config = load_model(path, "diffusion checkpoint")
    if config.get("model") != "noise2art-unet":
        raise UserError(f"{path} is not a Noise2Art diffusion checkpoint (model: {config.get('model')!r})")
    return tensors, config


def referenced_vqgan(path, config):
    """The VQGAN a diffusion checkpoint at `path` names (config["vqgan"], relative to its config file), or None
    where it embeds one."""
    return referenced_file(path, config, "vqgan")


def referenced_file(path, config, key):
    """The model file that config[key] of the checkpoint at `path` names, relative to it; None where it names none."""
    if config.get(key) is None:
        return None
    return Path(model_paths(path)[1]).resolve().parent / config[key]


def load_diffusion_model(path, device="cpu", use_ema=True, vqgan_path=None, **pipeline_options):
    """A Pipeline from a checkpoint written by save_diffusion_model, in eval mode, fp32. use_ema picks the EMA
    weights where the checkpoint has them; vqgan_path replaces the VQGAN the checkpoint names or embeds."""
    tensors, config = read_diffusion_model(path)
    try:
        unet = UNet(**config["unet"])
        schedule = NoiseSchedule(**config["schedule"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"diffusion checkpoint {path} has a malformed config: {err}") from None
    weights, config["weights"] = unet_weights(tensors, path, use_ema)
    load_weights(unet, weights, f"UNet weights '{config['weights']}.*' of {path}")
    vqgan_path = vqgan_path or referenced_vqgan(path, config)
    if vqgan_path is None:
        if "vqgan_config" not in config:
            raise UserError(f"diffusion checkpoint {path} names no VQGAN and embeds none")
        vqgan = VQModel(config["vqgan_config"])
        load_weights(vqgan, _weights(tensors, "vqgan."), f"VQGAN weights embedded in {path}")
    else:
        vqgan = load_vqgan(vqgan_path)
    unet = unet.to(device).eval().requires_grad_(False)
    vqgan = vqgan.to(device).eval().requires_grad_(False)
    pipeline_options.setdefault("prior", referenced_file(path, config, "prior"))
    return Pipeline(unet, schedule, vqgan, config, image_embedder=referenced_file(path, config, "image_embedder"),
                    **pipeline_options)


def export_diffusion_model(src, dst, dtype=torch.float16, prior=None, image_embedder=None):
    """A sampling-only copy of checkpoint `src` at `dst`: the EMA weights (the raw ones where there is no EMA)
    stored in `dtype`, the VQGAN embedded as before or referenced relative to `dst`, like the image embedder and
    the prior (`prior`, `image_embedder`: other files' paths instead of src's, e.g. copies shipped beside dst)."""
    pipeline = load_diffusion_model(src)
    config = {k: v for k, v in pipeline.config.items()
              if k not in ("weights", "vqgan", "vqgan_config", "image_embedder", "prior")}
    vqgan = referenced_vqgan(src, pipeline.config) or pipeline.vqgan
    image_embedder = image_embedder or referenced_file(src, pipeline.config, "image_embedder")
    prior = prior or referenced_file(src, pipeline.config, "prior")
    return save_diffusion_model(dst, {}, pipeline.unet.state_dict(), config, vqgan=vqgan, dtype=dtype,
                                image_embedder=image_embedder, prior=prior)


# ----------------------------------------------------------------------------------------------
# The sampling command's work: a SamplingRequest drawn with a loaded model into a folder of PNGs, each recording the
# command that redraws it


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    """What one sampling command draws and how its PNGs record it: sample_to_folder's input, read once from
    diffusion.py's flags by sampling_request (studio.py parses the command lines its widgets make the same way).
    options: Pipeline.sample_latents' sampling keywords (sampling_options; steps resolved, per sampler without
    --steps); prompts: one grid row each (None: unprompted); strength: the noise level images start from
    (start_strength: 0.75 with an init_image, LIKE_STRENGTH with `like` where none is given; None from pure noise);
    mix: as given (two `like` paintings blend at 0.5 without it); unet_ckpt_path None: the bundled model (named
    relative to the repository); vqgan, device, precision, no_ema: how the model was loaded, for the command."""
    num_images: int
    batch_size: int
    seed: int
    options: dict
    spacing: str
    eta: float = 0.0
    prompts: list | None = None
    negative_prompt: str | None = None
    init_image: str | None = None
    strength: float | None = None
    like: list | None = None
    mix: float | None = None
    prior: str | None = None
    interpolate: bool = False
    interpolate_to: int | None = None
    unet_ckpt_path: str | None = None
    vqgan: str | None = None
    device: str = "auto"
    precision: str = "auto"
    no_ema: bool = False

    def like_mix(self):
        """The blend of two `like` paintings (0.5 unless `mix`); None for one painting."""
        return None if self.like is None or len(self.like) < 2 else (0.5 if self.mix is None else self.mix)

    def interpolation_seeds(self):
        """The seeds of an interpolation's first and last frames."""
        return [self.seed, self.seed + 1 if self.interpolate_to is None else self.interpolate_to]


def default_checkpoint(conditional, like=False):
    """The bundled model a command without --unet_ckpt_path samples: unet-cond with --prompt, unet-like (the
    embedding-conditioned UNet) with --like, unet-uncond otherwise."""
    path = BUNDLED_MODELS / ("unet-cond.json" if conditional else "unet-like.json" if like else "unet-uncond.json")
    if not path.is_file():
        raise UserError(f"no bundled model at {path} yet: train one with trainer.py and pass it with --unet_ckpt_path")
    return path


def load_image(path, resolution, what="init image"):
    """An image file (any size PIL reads) as 1 x 3 x R x R in [-1, 1], centre-cropped; unreadable: UserError."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    return image_to_tensor(img, resolution)[None]  # 1 x 3 x R x R


def next_image_index(outdir):
    """Files are numbered 00000.png, 00001.png, ... continuing after what is already in outdir."""
    numbers = [int(p.stem) for p in Path(outdir).glob("*.png") if re.fullmatch(r"\d{5}", p.stem)]
    return max(numbers, default=-1) + 1


def like_embedding(images, mix, pipeline):
    """The image embedding 1 x E that --like asks for: of one painting (images 1 x 3 x S x S), or the spherical blend
    of two's (2 x 3 x S x S) at `mix`."""
    embeds = pipeline.embed_images(images)
    return embeds[:1] if len(images) == 1 else slerp(embeds[0], embeds[1], mix)[None]


def like_start(images, mix):
    """Where --like variations start below strength 1: the painting, or two cross-faded at `mix` (1 x 3 x S x S)."""
    return images[:1] if len(images) == 1 else torch.lerp(images[:1], images[1:], mix)


def run_parameters(request, checkpoint, pipeline, seed, num_images, prompts):
    """PNG text chunks: the parameters of `num_images` images from `seed` per caption of `prompts` (a list, or None
    for an unconditional model) that `request` draws with `pipeline` (loaded from `checkpoint`), and the command
    that makes them."""
    options = request.options
    bundled = request.unet_ckpt_path is None  # named relative to the repository, and implied by the command
    params = dict(checkpoint=f"{BUNDLED_MODELS.name}/{checkpoint.name} (bundled)" if bundled else str(checkpoint),
                  weights=pipeline.config.get("weights", "model"), seed=seed, num_images=num_images,
                  sampler=options["sampler"], steps=options["steps"], spacing=request.spacing,
                  lower_order_final=options["lower_order_final"], eta=request.eta, bf16=pipeline.bf16)
    command = ["python", "diffusion.py"] + ([] if bundled else ["--unet_ckpt_path", str(checkpoint)])
    if request.vqgan is not None:
        params["vqgan"] = str(request.vqgan)
        command += ["--vqgan", str(request.vqgan)]
    command += ["--seed", str(seed), "--num_images", str(num_images), "--sampler", options["sampler"],
                "--steps", str(options["steps"]), "--spacing", request.spacing, "--eta", str(request.eta),
                "--device", request.device, "--precision", request.precision]
    switches = {"lower_order_final": options["lower_order_final"], "no_ema": request.no_ema,
                "interpolate": request.interpolate}
    command += [f"--{flag}" for flag, on in switches.items() if on]
    if request.interpolate_to is not None:
        command += ["--interpolate_to", str(request.interpolate_to)]
    if prompts is not None:
        params.update(prompt=prompts[0] if len(prompts) == 1 else prompts, negative_prompt=request.negative_prompt,
                      guidance_scale=options["guidance_scale"], guidance_interval=options["guidance_interval"],
                      guidance_high=options["guidance_high"])
        command += ["--prompt", *prompts, "--guidance_scale", str(options["guidance_scale"])]
        for flag in ("guidance_interval", "guidance_high"):
            if options[flag] is not None:
                command += [f"--{flag}", *map(str, options[flag])]
        if request.negative_prompt is not None:
            command += ["--negative_prompt", request.negative_prompt]
    if request.init_image is not None:
        params.update(init_image=str(request.init_image))
        command += ["--init_image", str(request.init_image)]
    if request.strength is not None:
        params.update(strength=request.strength)
        command += ["--strength", str(request.strength)]
    if request.prior is not None:
        params.update(prior=request.prior)
        command += ["--prior", str(request.prior)]
    if request.like is not None:
        params.update(like=request.like, mix=request.like_mix())
        command += [arg for path in request.like for arg in ("--like", str(path))]
        command += ["--mix", str(request.mix)] if request.mix is not None else []
    if prompts is None and pipeline.unet.image_embed_dim is not None:  # guided against the null embedding
        params.update(guidance_scale=options["guidance_scale"])
        command += ["--guidance_scale", str(options["guidance_scale"])]
    return {"parameters": params, "command": shlex.join(command)}


def image_parameters(request, checkpoint, pipeline, index, prompt):
    """Image `index` of a caption's row: alone it is seed + index with one image; an interpolation frame needs its
    row."""
    prompts = None if prompt is None else [prompt]
    if request.interpolate:
        chunks = run_parameters(request, checkpoint, pipeline, request.seed, request.num_images, prompts)
        chunks["parameters"].update(interpolate=dict(seeds=request.interpolation_seeds(), frame=index))
        return chunks
    return run_parameters(request, checkpoint, pipeline, request.seed + index, 1, prompts)


def sample_to_folder(request, checkpoint, pipeline, outdir):
    """The sampling command's work once its model is loaded: the images `request` asks of `pipeline` (loaded from
    `checkpoint`), each saved to `outdir` with its PNG text chunks, then their grid. Returns (image paths, grid
    path). studio.py calls it with the requests its widgets make, so both write the same files."""
    size = pipeline.latent_shape[1] * pipeline.vqgan.downsample_factor
    like_images = None if request.like is None else torch.cat(  # 1 or 2 x 3 x S x S
        [load_image(path, size, "--like image") for path in request.like])
    init_image = None
    if request.init_image is not None:
        init_image = load_image(request.init_image, size)
    elif like_images is not None and request.strength < 1:
        init_image = like_start(like_images, request.like_mix())
    if request.interpolate:
        ends = [randn((1, *pipeline.latent_shape), torch.Generator().manual_seed(seed))
                for seed in request.interpolation_seeds()]
        frames = torch.cat([slerp(*ends, i / (request.num_images - 1)) for i in range(request.num_images)])
    like = None if like_images is None else like_embedding(like_images, request.like_mix(), pipeline)
    first = next_image_index(outdir)
    all_images, paths = [], []
    for prompt in request.prompts or [None]:  # one grid row per caption, each over the same seeds
        for start in range(0, request.num_images, request.batch_size):
            n = min(request.batch_size, request.num_images - start)
            images = pipeline.generate(
                n, request.seed + start, **request.options, prompt=prompt, negative_prompt=request.negative_prompt,
                eta=request.eta, strength=None if init_image is None else request.strength,
                init_images=None if init_image is None else init_image.expand(n, -1, -1, -1),
                noise=frames[start:start + n] if request.interpolate else None,
                image_embeds=None if like is None else like.expand(n, -1))
            for i, img in enumerate(tensor_to_images(images)):
                path = outdir / f"{first + len(paths):05d}.png"
                save_png(path, img, image_parameters(request, checkpoint, pipeline, start + i, prompt))
                paths.append(path)
                all_images.append(img)
    grid_path = outdir / GRID_NAME.format(first)
    grid_params = run_parameters(request, checkpoint, pipeline, request.seed, request.num_images, request.prompts)
    grid_params["files"] = [p.name for p in paths]
    row_each = request.interpolate or len(request.prompts or []) > 1  # a row per interpolation or per caption
    save_png(grid_path, make_grid(all_images, ncols=request.num_images if row_each else None), grid_params)
    return paths, grid_path


# ----------------------------------------------------------------------------------------------
# Command line: parse_args, then the readers that turn its flags into the explicit arguments above (sampling_options,
# use_bf16, start_strength, sampling_request); only they and main see `args`.


def add_sampling_arguments(parser, unprompted_steps=None):
    """The sampling flags diffusion.py and evaluate.py --samples_from share; sampling_options(args) reads them.
    unprompted_steps: the default steps per sampler without --prompt, where they differ from DEFAULT_STEPS."""
    parser.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS), help="sampling algorithm")
    unprompted_help = f"; without --prompt: {unprompted_steps}" if unprompted_steps else ""
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"denoising steps (default per sampler: {DEFAULT_STEPS}{unprompted_help})")
    parser.add_argument("--spacing", default="auto", choices=["auto", "karras", "even"],
                        help="timesteps spaced as Karras et al. 2022 (rho = 7) or evenly in t; auto = the sampler's "
                             "own: even for ddpm and ddim, karras for dpmpp-2m (even for a zero-terminal-SNR "
                             "schedule, whose largest sigma is infinite)")
    parser.add_argument("--lower_order_final", action="store_true",
                        help="dpmpp-2m: first-order step into the last timestep (as diffusers' lower_order_final)")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE_SCALE,
                        help="classifier-free guidance scale with --prompt, at least 0 (1 = the conditional "
                             "prediction alone, 0 = the unconditional one; default: %(default)s)")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=list(DEFAULT_GUIDANCE_INTERVAL),
                        metavar=("SIGMA_LOW", "SIGMA_HIGH"),
                        help="guide only where the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) is in "
                             "(LOW, HIGH] (Kynkäänniemi et al. 2024); elsewhere the conditional prediction alone "
                             "(default: %(default)s; 0 inf guides every step)")
    parser.add_argument("--guidance_high", type=non_negative_float, nargs=2, default=None,
                        metavar=("SCALE", "SIGMA"),
                        help="guide at SCALE instead of --guidance_scale where sigma > SIGMA (inside the interval): "
                             "strong guidance at the high noise levels where the layout is set (default: one scale)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16 autocast or fp32; auto = bf16 where it pays (CUDA; CPUs with AVX512-BF16 / "
                             "AMX whose bf16 matmul measures >= 1.3x faster), fp32 elsewhere")


def sampling_options(args, default_steps=DEFAULT_STEPS):
    """Pipeline.sample_latents keyword arguments from add_sampling_arguments' flags; steps from default_steps per
    sampler where --steps is not given."""
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] < args.guidance_interval[1]:
        raise UserError(f"--guidance_interval needs 0 <= SIGMA_LOW < SIGMA_HIGH, got {args.guidance_interval}")
    return dict(sampler=args.sampler, steps=args.steps or default_steps[args.sampler],
                karras={"auto": None, "karras": True, "even": False}[args.spacing],
                lower_order_final=args.lower_order_final, guidance_scale=args.guidance_scale,
                guidance_interval=args.guidance_interval, guidance_high=args.guidance_high)


def use_bf16(precision, device):
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def parse_args(argv):
    parser = ArgumentParser(__file__, description="Generate paintings with a trained latent diffusion model.")
    parser.add_argument("--unet_ckpt_path", default=None,
                        help="diffusion checkpoint (NAME, NAME.json or NAME.safetensors); default: the bundled "
                             "models/unet-uncond.json, or models/unet-cond.json with --prompt")
    parser.add_argument("--vqgan", default=None,
                        help="decode with this VQGAN (NAME, NAME.json or NAME.safetensors) instead of the "
                             "checkpoint's: one of the same latent space, such as a decoder fine-tune")
    parser.add_argument("--num_images", type=positive_int, default=16, help="how many images to generate")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images denoised together")
    add_sampling_arguments(parser, UNPROMPTED_STEPS)
    parser.add_argument("--eta", type=non_negative_float, default=0.0,
                        help="DDIM noise: 0 deterministic, 1 = DDPM (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i, so any image can be redone alone")
    parser.add_argument("--prompt", nargs="+", default=None,
                        help="caption to steer a text-conditioned model; several captions give one grid row each "
                             "(--num_images per caption, the same seeds)")
    parser.add_argument("--negative_prompt", default=None, help="caption to steer away from (replaces the null "
                                                                "embedding in classifier-free guidance)")
    parser.add_argument("--init_image", default=None, help="img2img: start from this image (SDEdit)")
    parser.add_argument("--strength", type=float, default=None,
                        help="img2img: how far to noise the init image, in (0, 1]: to the noise level of timestep "
                             "strength x (T - 1), whatever the sampler and spacing; 1 = pure noise (default 0.75). "
                             "With --like: variations start from the painting (two: their cross-fade) noised so "
                             f"far, 1 = from pure noise, the embedding alone (default {LIKE_STRENGTH})")
    parser.add_argument("--like", action="append", default=None, metavar="IMAGE",
                        help="variations of a painting (any size; JPEG, PNG, WebP): a model trained with "
                             "--image_embeddings draws fresh paintings of its image embedding; give it twice to "
                             "blend two paintings (--mix)")
    parser.add_argument("--mix", type=float, default=None,
                        help="with two --like: how far from the first painting's embedding to the second's, in "
                             "[0, 1] (spherical interpolation; default 0.5)")
    parser.add_argument("--prior", default=None,
                        help="for a model trained with --image_embeddings: the prior.py model its samples draw their "
                             "embeddings from (default: the one its config names), or 'none' for its unconditional "
                             "mode; with --export, the prior the copy names")
    parser.add_argument("--interpolate", action="store_true",
                        help="slerp the start noise from --seed to --seed + 1 over --num_images frames")
    parser.add_argument("--interpolate_to", type=int, default=None, metavar="SEED",
                        help="with --interpolate: the seed of the last frame's noise (default: --seed + 1)")
    parser.add_argument("--outdir", default="samples", help="folder for the PNGs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA ones")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format for the UNet and the VQGAN decoder (faster convolutions; "
                             "--no-channels_last: plain NCHW)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off for many images)")
    parser.add_argument("--export", metavar="DST", default=None,
                        help="instead of sampling, write a sampling-only copy of the checkpoint to DST: EMA weights "
                             "in --export_dtype, the VQGAN reference kept (how the bundled models were made)")
    parser.add_argument("--export_dtype", default="fp16", choices=list(EXPORT_DTYPES), help="storage type for --export")
    return parser.parse_args(argv)


def check_args(args):
    if args.strength is not None and args.init_image is None and args.like is None:
        raise UserError("--strength needs an --init_image or --like")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    if args.interpolate and args.num_images < 2:
        raise UserError("--interpolate needs --num_images of at least 2")
    if args.interpolate_to is not None and not args.interpolate:
        raise UserError("--interpolate_to needs --interpolate")
    if args.like is not None and len(args.like) > 2:
        raise UserError(f"--like takes one painting (variations) or two (a blend), got {len(args.like)}")
    if args.mix is not None and (args.like is None or len(args.like) != 2):
        raise UserError("--mix needs two --like paintings")
    if args.like is not None and args.prompt is not None:
        raise UserError("--like draws variations of a painting and takes no --prompt")
    if args.mix is not None and not 0 <= args.mix <= 1:
        raise UserError(f"--mix must be in [0, 1], got {args.mix}")


def start_strength(args):
    """The noise level images start from: --strength, else 0.75 with --init_image, LIKE_STRENGTH with --like; None
    (pure noise) without either."""
    if args.strength is not None or (args.init_image is None and args.like is None):
        return args.strength
    return 0.75 if args.init_image is not None else LIKE_STRENGTH


def sampling_request(args):
    """The SamplingRequest of parsed (and checked: check_args) flags `args`; a bad sampling flag is a UserError
    here, before any model loads."""
    return SamplingRequest(
        num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
        options=sampling_options(args, DEFAULT_STEPS if args.prompt else UNPROMPTED_STEPS), spacing=args.spacing,
        eta=args.eta, prompts=args.prompt, negative_prompt=args.negative_prompt, init_image=args.init_image,
        strength=start_strength(args), like=args.like, mix=args.mix, prior=args.prior, interpolate=args.interpolate,
        interpolate_to=args.interpolate_to, unet_ckpt_path=args.unet_ckpt_path, vqgan=args.vqgan,
        device=args.device, precision=args.precision, no_ema=args.no_ema)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    request = sampling_request(args)  # refuses bad sampling flags before the model loads
    checkpoint = args.unet_ckpt_path or default_checkpoint(args.prompt is not None, like=args.like is not None)
    if args.export:
        if args.prior == "none":
            raise UserError("--export --prior takes the path of the prior the copy should name")
        weights = export_diffusion_model(checkpoint, args.export, EXPORT_DTYPES[args.export_dtype], args.prior)
        print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB)")
        return 0
    outdir = check_output_folder(args.outdir, "--outdir")
    device = pick_device(args.device)
    prior = {} if args.prior is None else {"prior": None if args.prior == "none" else args.prior}
    pipeline = load_diffusion_model(checkpoint, device, use_ema=not args.no_ema, vqgan_path=args.vqgan,
                                    bf16=use_bf16(args.precision, device), channels_last=args.channels_last,
                                    compile=args.compile, **prior)
    paths, grid_path = sample_to_folder(request, checkpoint, pipeline, outdir)
    print(f"wrote {len(paths)} images {paths[0].name}..{paths[-1].name} and {grid_path.name} to {outdir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
