"""Train the denoising UNet in the latent space of a frozen VQGAN (Rombach et al. 2022) with the simplified DDPM
loss (Ho et al. 2020): predict the noise (or v) that was added to VQGAN latents.

The VQGAN encodes the data set once, every image and its mirror image, into a latent cache that later runs reuse;
the cache is keyed by the VQGAN's weights, the resolution, the data set, --max_images and the captions, and is
rebuilt when any of them changes (an unconditional run also takes a conditional run's latents and ignores its
captions). Training reads latents, never pixels. With --conditional, captions (a metadata
column or a template over columns) are encoded once by the frozen text encoder and cached with the latents; they
are dropped with probability --cond_drop during training so that one model serves classifier-free guidance.

Two training levers, both off by default (docs/ablation.md): --timestep_sampling logit-normal|laplace spends the loss
where the log-SNR is middling (schedule.py, sample_log_snr); --repa_weight W aligns a UNet stage (--repa_layer) with
frozen EfficientNet-Lite2 feature maps of every cached image and its mirror (REPA, Yu et al. 2024), computed once
into a second cache beside the latent cache (LATENT_CACHE-repa), through a training-only projector that is saved in
the checkpoints but never exported.

This file is the command: it prepares a run (caches, models, resume), loops, checkpoints, draws sample grids and
reads the flags. The optimizer step it loops over (the loss, EMA, the REPA projector) is unet_training.py's.

    python trainer.py --dataset_path ../shared/wikiart-mini --vqgan_ckpt runs/vq/vqgan --output_dir runs/unet
    python trainer.py ... --conditional --caption_template "a {style} painting"      # text conditioning
    python trainer.py ... --resume auto            # continue the latest checkpoint in --output_dir, exactly
    python trainer.py ... --timestep_sampling logit-normal --repa_weight 0.5 --repa_until 4000   # the levers
    torchrun --nproc_per_node 4 trainer.py ...     # DistributedDataParallel, one process per GPU
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 trainer.py ...  # on nodes R = 0, 1,
                                                   # with --output_dir on a filesystem both nodes share
    python diffusion.py --unet_ckpt_path runs/unet/unet --prompt "a Baroque painting"   # sample the result

Output folder: latent_cache/ (unless --latent_cache; with REPA also latent_cache-repa/), checkpoints/step_NNNNNNN/
(resumable training state, the last --keep_last), unet.safetensors + unet.json (the sampling checkpoint
diffusion.py reads, EMA weights included), samples/step_NNNNNNN.png (EMA samples, fixed seeds and prompts),
log.jsonl (with REPA also repa_loss), loss.png.
"""
import argparse
import functools
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import (
    atomic_write, check_run_identity, checkpoint_path, file_digest, load_resume, load_weights, prune_checkpoints,
    save_state_dir,
)
from cli import (
    ArgumentParser, UserError, int_list, non_negative_float, non_negative_int, positive_float, positive_int, run_cli,
)
from devices import native_bf16
from diffusion import Pipeline, save_diffusion_model
from distributed import any_rank, gather_rng_states, is_main, say, setup_distributed
from images import ImageSource, make_grid, save_png, tensor_to_images
from latent_cache import cache_batch, cache_on, dataset_cache, image_embed_dim, packed_cache, read_image_embeds
from samplers import DEFAULT_GUIDANCE_SCALE, SAMPLERS
from schedule import PREDICTION_TYPES, TIMESTEP_SAMPLINGS, NoiseSchedule, make_betas
from text_encoder import DEFAULT_TEXT_ENCODER
from training_loop import (
    LogWindow, StopSignal, append_log, batch_rows, due, lr_factor, read_log, seed_everything, set_rng_state, start_log,
    stream_position,
)
from unet import UNET_CONFIGS, complete_config
from unet_training import (
    UNET_OVERRIDES, build_training, check_repa_layer, init_from_checkpoint, make_projector, make_unet, train_step,
)
from vqgan import latents_digest, load_vqgan


# ----------------------------------------------------------------------------------------------
# Checkpoints: OUTDIR/checkpoints/step_NNNNNNN (save_state_dir) + the exported sampling checkpoint OUTDIR/unet


def check_same_architecture(state, unet, path):
    saved = state.get("config", {}).get("unet") if isinstance(state, dict) else None
    if saved is None:
        raise UserError(f"{path} is not a trainer.py checkpoint (it holds no UNet configuration)")
    saved = complete_config(saved)
    different = [f"{k} {unet.config.get(k)} here, {saved.get(k)} there" for k in sorted(set(saved) | set(unet.config))
                 if saved.get(k) != unet.config.get(k)]
    if different:
        raise UserError(f"{path} was trained with a different UNet ({'; '.join(different)}): pass the same "
                        "--unet_size, overrides, --resolution and VQGAN, or start a new --output_dir")


def restore(run, state, path, rank, world_size):
    """Continue checkpoint `path` at the peak learning rates the run was built with (--lr may change on resume)."""
    if ("repa_projector" in state) != (run.projector is not None):
        raise UserError(f"{path} was trained {'with' if 'repa_projector' in state else 'without'} REPA: resume it "
                        "with the --repa_weight it had (switch REPA off with --repa_until), or start a new run")
    load_weights(run.unet, state["model"], f"UNet weights of {path}")
    load_weights(run.ema, state["ema"], f"EMA weights of {path}")
    if run.projector is not None:
        load_weights(run.projector, state["repa_projector"], f"REPA projector of {path}")
    peaks = list(run.lr_scheduler.base_lrs)
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.step = state["step"]
    run.steps_before = state.get("steps_before", 0)
    run.lr_scheduler.base_lrs = peaks
    for group, peak, factor in zip(run.optimizer.param_groups, peaks, run.lr_scheduler.lr_lambdas):
        group["lr"] = peak * factor(run.lr_scheduler.last_epoch)
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    else:
        seed_everything(state["step"] * 1_000_003 + rank)
        say(f"{path} was saved by {len(state['rng'])} processes, this run has {world_size}: "
            "random streams restart (the continuation is not bit-exact)")


def sampling_config(run, cache, prediction_type, text_encoder, max_text_length, settings):
    """The JSON of a diffusion checkpoint (DEVELOPERS.md), less the VQGAN reference save_diffusion_model adds:
    `text_encoder` is the encoder's name (None: unconditional), `settings` the run's resolved flags as recorded."""
    return dict(unet=run.unet.config, schedule=run.schedule.config, prediction_type=prediction_type,
                latent_shape=list(cache["latents"].shape[2:]), latent_scale=cache["latent_scale"],
                text_encoder=text_encoder, max_text_length=max_text_length,
                training=dict(step=run.step, total_steps=run.steps_before + run.step, images=len(cache["latents"]),
                              latent_scale_source=cache["latent_scale_source"], args=settings))


def save_checkpoint(run, out, config, identity, keep_last, vqgan, image_embedder=None):
    """Every process contributes its RNG state; rank 0 writes OUT/checkpoints/step_N (with `config`, the
    sampling_config, and the run's `identity`), prunes to the `keep_last` newest and exports OUT/unet (`vqgan`: the
    VQModel to embed or its path; `image_embedder`: a path or None). Returns the checkpoint folder."""
    rng_states = gather_rng_states()
    path = checkpoint_path(out / "checkpoints", run.step)
    if not is_main():
        return path
    state = {"step": run.step, "config": config, "model": run.unet.state_dict(), "ema": run.ema.state_dict(),
             "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
             "rng": rng_states, "identity": identity, "steps_before": run.steps_before}
    if run.projector is not None:  # training-only: in the resumable state, never in the exported model
        state["repa_projector"] = run.projector.state_dict()
    save_state_dir(path, state)
    prune_checkpoints(out / "checkpoints", keep_last)
    save_diffusion_model(out / "unet", run.unet.state_dict(), run.ema.state_dict(), config, vqgan=vqgan,
                         image_embedder=image_embedder)
    return path


# ----------------------------------------------------------------------------------------------
# Feedback: log.jsonl, sample grids, loss curve


def sample_prompts(num_samples, prompts, captions):
    """`num_samples` prompts for the sample grids, cycling through `prompts` (--sample_prompts), else through the
    dataset's first distinct `captions`; None for an unconditional run (no captions)."""
    if captions is None:
        return None
    prompts = prompts or captions
    return [prompts[i % len(prompts)] for i in range(num_samples)]


def save_samples(path, pipeline, num_samples, step, sampler="dpmpp-2m", steps=20, prompts=None,
                 guidance_scale=DEFAULT_GUIDANCE_SCALE):
    """A grid of `num_samples` EMA samples from fixed seeds (image i from seed i) and fixed prompts."""
    images = pipeline.generate(num_samples, seed=0, sampler=sampler, steps=steps, prompt=prompts,
                               guidance_scale=guidance_scale, progress=False)
    text = dict(step=step, sampler=sampler, steps=steps, seeds=f"0..{num_samples - 1}")
    if prompts is not None:
        text.update(prompts=prompts, guidance_scale=guidance_scale)
    save_png(path, make_grid(tensor_to_images(images)), text)


def plot_loss_curve(log_path, png_path):
    """loss.png from log.jsonl (matplotlib's Agg renderer through Figure, no GUI backend)."""
    from matplotlib.figure import Figure

    entries = read_log(log_path)
    if not entries:
        return
    fig = Figure(figsize=(7, 4), tight_layout=True)
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], lw=1)
    ax.set(xlabel="step", ylabel="loss (mean per log interval)", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))


# ----------------------------------------------------------------------------------------------
# Training


def load_text_encoder(name, max_length, device, embeddings=None):
    """The frozen text encoder `name`, or its captions encoded in advance in `embeddings` (--text_embeddings)."""
    from text_encoder import PrecomputedTextEncoder, TextEncoder

    if embeddings is None:
        return TextEncoder(name, device, max_length)
    encoder = PrecomputedTextEncoder(embeddings, device)
    if (encoder.name, encoder.max_length) != (name, max_length):
        raise UserError(f"--text_embeddings {embeddings} holds {encoder.name} at {encoder.max_length} "
                        f"tokens, not --text_encoder {name} at --max_text_length {max_length}")
    return encoder


def prepare(args, rank, world_size, device):
    """Check the inputs (before any training), load the frozen VQGAN and text encoder, read or build the latent
    cache, build the UNet and its optimizer and restore a checkpoint. Returns (run, cache, vqgan, text_encoder,
    checkpoint resumed from or None, the run's identity)."""
    out = Path(args.output_dir)
    resume_path, state = load_resume(args.resume, out / "checkpoints", "choose another --output_dir", warn=say)
    vqgan = load_vqgan(args.vqgan_ckpt, device)
    resolution = args.resolution or vqgan.config["resolution"]
    if resolution % vqgan.downsample_factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VQGAN's downsampling factor "
                        f"{vqgan.downsample_factor}")
    vqgan_digest = latents_digest(args.vqgan_ckpt)
    embeddings_digest = args.image_embeddings and file_digest(Path(args.image_embeddings) / "cache.safetensors")
    identity = run_identity(args, vqgan_digest, resolution, embeddings_digest)
    text_encoder = None
    if args.conditional:
        text_encoder = load_text_encoder(args.text_encoder, args.max_text_length, device, args.text_embeddings)
    seed_everything(args.seed)  # the initial weights depend on the seed alone
    unet = make_unet(args.unet_size, vqgan.config["embed_dim"], resolution // vqgan.downsample_factor,
                     text_encoder.dim if text_encoder else None, unet_overrides(args), args.pooled_text_embed,
                     image_embed_dim(args.image_embeddings))
    if args.repa_weight:
        check_repa_layer(args.repa_layer, unet)
    if state is not None:
        check_same_architecture(state, unet, resume_path)
        check_run_identity(state.get("identity"), identity, resume_path, "start a new --output_dir")
    steps_before = 0
    if state is None and args.init_from:
        new, steps_before = init_from_checkpoint(unet, args.init_from)
        shown = ", ".join(new[:2]) + (", ..." if len(new) > 2 else "")
        say(f"initial weights from {args.init_from}" + (f"; {len(new)} new tensors ({shown})" if new else ""))

    if args.packed_latents:
        cache = packed_cache(args.packed_latents, vqgan, resolution, caption_settings(args))
    else:
        cache = dataset_cache(
            Path(args.latent_cache) if args.latent_cache else Path(args.output_dir) / "latent_cache",
            ImageSource(args.dataset_path, args.split, args.image_column), vqgan, resolution, vqgan_digest, device,
            args.max_images, args.batch_size, args.bf16, args.num_workers, caption_settings(args), text_encoder,
            repa=dict(image_size=args.repa_image_size, channels=args.repa_channels) if args.repa_weight else None)
    if cache["skipped"]:
        say(f"warning: {cache['skipped']} unreadable images were left out of the latent cache")
    if args.image_embeddings:
        cache = {**cache, "image_embeds": read_image_embeds(args.image_embeddings, len(cache["latents"]))}
    cache = cache_on(cache, device)

    seed_everything(args.seed + rank)  # each process draws its own timesteps, noise, flips and caption drops
    projector = make_projector(unet, args.repa_layer, cache["repa"].shape[2:], args.seed) if args.repa_weight else None
    run = build_training(unet, device, noise_schedule(args), args.lr, lr_schedule_of(args), args.weight_decay,
                         args.channels_last, projector, args.image_embed_lr_scale)
    run.steps_before = steps_before
    if state is not None:
        restore(run, state, resume_path, rank, world_size)
        say(f"resumed from {resume_path} at step {run.step}")
    return run, cache, vqgan, text_encoder, resume_path, identity


def log_entry(window, step, lr, samples_per_step, num_rows):
    """A log.jsonl line: means over the steps since the last one (a LogWindow); repa_loss while REPA is on."""
    means, steps_per_s = window.means(), window.steps_per_s()
    entry = {"step": step, "epoch": round(step * samples_per_step / num_rows, 3), "loss": means["loss"], "lr": lr,
             "grad_norm": means["grad_norm"], "steps_per_s": steps_per_s,
             "samples_per_s": steps_per_s * samples_per_step}
    if "repa_loss" in means:
        entry["repa_loss"] = means["repa_loss"]
    return entry


def train(args, rank, world_size, device):
    out = Path(args.output_dir)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run, cache, vqgan, text_encoder, checkpoint, identity = prepare(args, rank, world_size, device)
    if args.max_steps == 0:
        say("--max_steps 0: the latent cache is ready; nothing trained")
        return 0
    log_path = out / "log.jsonl"
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        start_log(log_path, run.step)
    config = functools.partial(sampling_config, run, cache, args.prediction_type,
                               args.text_encoder if args.conditional else None, args.max_text_length, vars(args))
    image_embedder = args.image_embeddings and Path(args.image_embeddings) / "embedder"
    pipeline = Pipeline(run.ema, run.schedule, vqgan, config(), text_encoder=text_encoder, bf16=args.bf16,
                        channels_last=args.channels_last)  # the EMA keeps the training's layout
    prompts = sample_prompts(args.num_samples, args.sample_prompts, cache["captions"] if args.conditional else None)
    num_rows = len(cache["latents"])
    samples_per_step = args.batch_size * args.grad_accum * world_size
    say(f"UNet {args.unet_size}: {sum(p.numel() for p in run.unet.parameters()) / 1e6:.2f}M parameters; latents "
        f"{tuple(cache['latents'].shape[2:])}, scale {cache['latent_scale']:.4f} ({cache['latent_scale_source']}); "
        f"{num_rows} images x 2 flips; batch {args.batch_size} x {args.grad_accum} accumulation x {world_size} "
        f"processes = {samples_per_step}; {device}{', bf16' if args.bf16 else ''}")

    window = LogWindow()
    bar = tqdm(total=args.max_steps, initial=run.step, desc="train", unit="step", disable=not is_main(),
               dynamic_ncols=True)
    with StopSignal() as stop:
        while run.step < args.max_steps:
            positions = [stream_position(run.step, micro, rank, world_size, args.batch_size, args.grad_accum)
                         for micro in range(args.grad_accum)]
            micro_batches = [cache_batch(cache, batch_rows(num_rows, args.batch_size, args.seed, position), device)
                             for position in positions]
            lr = run.optimizer.param_groups[0]["lr"]
            loss, grad_norm, repa = train_step(run, micro_batches, loss_settings(args), args.bf16, args.grad_clip,
                                               args.ema_decay, args.repa_weight, args.repa_until)
            if not math.isfinite(grad_norm):
                bar.close()
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
                raise UserError(f"{what} at step {run.step + 1}: training diverged (lower --lr, keep --grad_clip on); "
                                f"the last good checkpoint is {checkpoint or 'none (nothing saved)'}")
            window.add({"loss": loss, "grad_norm": grad_norm, "repa_loss": repa})
            bar.update(1)
            step = run.step
            if is_main() and due(step, args.log_every, args.max_steps):
                entry = log_entry(window, step, lr, samples_per_step, num_rows)
                append_log(log_path, entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}")
                window.reset()
            stopping = any_rank(stop.name is not None, device)
            with window.paused():  # steps/s measures training alone
                if due(step, args.save_every, args.max_steps, stopping):
                    checkpoint = save_checkpoint(run, out, config(), identity, args.keep_last,
                                                 vqgan if args.embed_vqgan else args.vqgan_ckpt, image_embedder)
                if is_main() and args.sample_every and step % args.sample_every == 0:
                    save_samples(out / "samples" / f"step_{step:07d}.png", pipeline, args.num_samples, step,
                                 args.sampler, args.sample_steps, prompts, args.guidance_scale)
            if stopping:
                say(f"stopped by {stop.name or 'a signal to another process'} after step {step}: saved {checkpoint}; "
                    "continue with --resume auto")
                break
    bar.close()
    if is_main() and log_path.is_file():
        plot_loss_curve(log_path, out / "loss.png")
        say(f"step {run.step}: checkpoint {checkpoint}, sampling checkpoint {out / 'unet'}.safetensors, "
            f"log {log_path}, loss curve {out / 'loss.png'}")
    return 0


# ----------------------------------------------------------------------------------------------
# Command line: parse_args resolves every default once (a new Namespace, never changed later); the functions after it
# read the parsed flags into the explicit arguments the helpers above take. Nothing above this line sees `args`
# except prepare and train, the command's body.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the flag is required or its help already names the default."""

    def _get_help_string(self, action):
        return action.help if action.required or "default" in action.help else super()._get_help_string(action)


def parse_args(argv=None):
    p = ArgumentParser(__file__, description="Train a latent-diffusion UNet on VQGAN latents of a dataset.",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_path", default=None,
                   help="ImageFolder (as download_hf.py writes), image folder, or Hugging Face dataset name/path "
                        "(this or --packed_latents)")
    g.add_argument("--packed_latents", default=None,
                   help="train on latents packed by packing.py (VQGAN codes) instead of --dataset_path: no images "
                        "are read and `datasets` is not needed (a rented GPU machine, experiments/train_gpu.sh)")
    g.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    g.add_argument("--image_column", default="image", help="image column (Hugging Face datasets)")
    g.add_argument("--max_images", type=positive_int, default=None, help="use only the first N images (default: all)")
    g.add_argument("--resolution", type=positive_int, default=None,
                   help="image size (shorter side resized, centre crop); default: the VQGAN's training resolution")
    g.add_argument("--vqgan_ckpt", required=True, help="frozen VQGAN exported by vqgan.py (NAME[.safetensors|.json])")
    g.add_argument("--latent_cache", default=None,
                   help="latent cache folder (default: OUTPUT_DIR/latent_cache); rebuilt when its inputs change")
    g.add_argument("--num_workers", type=non_negative_int, default=2,
                   help="image-decoding processes while the cache is built")
    g = p.add_argument_group("model")
    g.add_argument("--unet_size", default="small", choices=list(UNET_CONFIGS), help="named UNet size (unet.py)")
    size = "; default: the --unet_size's"
    g.add_argument("--model_channels", type=int, default=None, help="override: base width (multiple of 32)" + size)
    g.add_argument("--channel_mult", type=int_list, default=None,
                   help="override: width multipliers per level, e.g. 1,2,2" + size)
    g.add_argument("--num_res_blocks", type=int, default=None, help="override: ResNet blocks per level" + size)
    g.add_argument("--attention_resolutions", type=int_list, default=None,
                   help="override: latent sizes with attention blocks, e.g. 16,8" + size)
    g.add_argument("--num_heads", type=int, default=None, help="override: attention heads" + size)
    g.add_argument("--dropout", type=float, default=None, help="override: dropout in the ResNet blocks" + size)
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", default="scaled_linear", choices=["linear", "scaled_linear", "cosine"],
                   help="noise schedule (schedule.py; the bundled models': scaled_linear)")
    g.add_argument("--num_train_timesteps", type=positive_int, default=1000, help="diffusion steps T")
    g.add_argument("--beta_start", type=float, default=0.0015,
                   help="first beta of a linear kind (the bundled models' and LDM's f4 models': 0.0015)")
    g.add_argument("--beta_end", type=float, default=0.0195,
                   help="last beta of a linear kind (the bundled models' and LDM's f4 models': 0.0195)")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the schedule to end at pure noise (Lin et al. 2023; needs --prediction_type v)")
    g.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES, help="what the UNet predicts")
    g.add_argument("--min_snr_gamma", type=non_negative_float, default=5.0,
                   help="min-SNR loss weighting (Hang et al. 2023; the bundled models': 5); 0 = unweighted")
    g.add_argument("--timestep_sampling", default="uniform", choices=list(TIMESTEP_SAMPLINGS),
                   help="training timesteps: uniform over 0..T-1 (DDPM), or fractional ones at a log-SNR drawn from "
                        "logit-normal (Esser et al. 2024) or laplace (Hang et al. 2024) and mapped through the "
                        "schedule's inverse; combines with --min_snr_gamma")
    g.add_argument("--timestep_loc", type=float, default=None,
                   help="logit-normal: mean of logit(t) of the rectified-flow noise level t (log-SNR = -2 logit(t)); "
                        "laplace: centre of the log-SNR (default: 0 for both, the papers' choice)")
    g.add_argument("--timestep_scale", type=positive_float, default=None,
                   help="logit-normal: std of logit(t); laplace: scale of the log-SNR (default: 1 and 0.5, the "
                        "papers' choices)")
    g = p.add_argument_group("representation alignment (REPA with EfficientNet-Lite2 targets; off by default)")
    g.add_argument("--repa_weight", type=non_negative_float, default=0.0,
                   help="weight of the REPA loss (negative cosine per position; Yu et al. 2024 use 0.5); 0 = off")
    g.add_argument("--repa_layer", default=None,
                   help="UNet stage aligned: middle, down.N or up.N (unet.py feature_shapes; default: middle, as "
                        "U-REPA does for UNets)")
    g.add_argument("--repa_until", type=non_negative_int, default=None,
                   help="switch the REPA loss off after this many optimizer steps (default: never)")
    g.add_argument("--repa_image_size", type=int, default=256,
                   help="images are resized to this (a multiple of 32) for the teacher: its target grid is size/32")
    g.add_argument("--repa_channels", type=positive_int, default=64, help="PCA components of the teacher features kept")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=non_negative_int, default=20000,
                   help="optimizer steps (0: build the latent cache and stop)")
    g.add_argument("--batch_size", type=positive_int, default=32, help="samples per micro-batch per process")
    g.add_argument("--grad_accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW peak learning rate")
    g.add_argument("--lr_schedule", default="cosine", choices=["constant", "cosine"],
                   help="after the warm-up: constant, or a half cosine from --lr down to --min_lr at --max_steps")
    g.add_argument("--warmup_steps", type=non_negative_int, default=200, help="linear learning-rate warm-up")
    g.add_argument("--min_lr", type=non_negative_float, default=2e-5, help="final learning rate of the cosine schedule")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.01,
                   help="AdamW weight decay (weights, not biases/norms)")
    g.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--ema_decay", type=float, default=0.999,
                   help="EMA decay: an average over about 1 / (1 - decay) steps; a fresh run reaches it after a "
                        "warm-up, a run from --init_from uses it from the first step")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on where bf16 pays (CUDA; CPUs with "
                   "AVX512-BF16/AMX whose bf16 matmul measures >= 1.3x faster than fp32), off elsewhere")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="UNet weights in channels-last layout (faster convolutions on CPUs; the same training to "
                   "rounding; may change on resume)")
    g.add_argument("--seed", type=int, default=0, help="random seed (initial weights, data order, noise)")
    g = p.add_argument_group("text conditioning")
    g.add_argument("--conditional", action="store_true", help="train a text-conditioned UNet")
    g.add_argument("--caption_column", default=None, help="metadata column holding the captions (default: none)")
    g.add_argument("--caption_template", default=None,
                   help='captions made from metadata columns, e.g. "a {style} painting by {artist}" (default: none)')
    g.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="frozen Hugging Face text encoder")
    g.add_argument("--max_text_length", type=positive_int, default=32, help="tokens per caption")
    g.add_argument("--text_embeddings", default=None,
                   help="captions encoded in advance by text_encoder.py --save: the encoder's weights are not loaded")
    g.add_argument("--pooled_text_embed", action=argparse.BooleanOptionalAction, default=None,
                   help="also add each caption's mean token embedding to the timestep embedding (a linear layer that "
                   "starts at zero, so --init_from a model without it starts where that model was); default: on "
                   "with --conditional, as in the bundled style model")
    g.add_argument("--cond_drop", type=float, default=0.1,
                   help="probability of dropping a caption (or an image embedding) in training (classifier-free "
                        "guidance)")
    g = p.add_argument_group("image-embedding conditioning (RCG / unCLIP style; off by default)")
    g.add_argument("--image_embeddings", default=None, metavar="FOLDER",
                   help="condition the UNet on the image embeddings image_embedding.py wrote to FOLDER (each "
                        "painting's own, dropped with --cond_drop for guidance); a zero-initialised projection, so "
                        "--init_from a model without it starts where that model was")
    g.add_argument("--image_embed_lr_scale", type=positive_float, default=30.0,
                   help="learning rate of the image-embedding projection as a multiple of --lr: a projection that "
                        "starts at zero learns slowly at the UNet's rate; 30 trained the bundled unet-like's last "
                        "stage (docs/embedding-prior.md)")
    g = p.add_argument_group("checkpoints and feedback")
    g.add_argument("--output_dir", default="runs/unet", help="checkpoints, exported model, samples, log")
    g.add_argument("--save_every", type=positive_int, default=1000, help="steps between checkpoints (and at the end)")
    g.add_argument("--keep_last", type=positive_int, default=3, help="checkpoints kept")
    g.add_argument("--init_from", default=None,
                   help="start from the weights of a diffusion checkpoint (e.g. runs/unet/unet; EMA where it has "
                        "them), fine-tuning it; a conditional run may start from an unconditional checkpoint "
                        "(its cross-attention starts at zero); --resume, when it finds a checkpoint, wins "
                        "(default: fresh weights)")
    g.add_argument("--resume", default=None,
                   help="'auto' (newest checkpoint in OUTPUT_DIR, if any) or a checkpoint folder; default: a fresh run")
    g.add_argument("--embed_vqgan", action="store_true",
                   help="embed the VQGAN in the exported unet.safetensors instead of referencing its path")
    g.add_argument("--log_every", type=positive_int, default=10, help="steps between log.jsonl lines")
    g.add_argument("--sample_every", type=non_negative_int, default=1000,
                   help="steps between EMA sample grids (0 = never)")
    g.add_argument("--num_samples", type=positive_int, default=8, help="images per sample grid")
    g.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS), help="sampler for the grids")
    g.add_argument("--sample_steps", type=positive_int, default=20, help="sampler steps for the grids")
    g.add_argument("--sample_prompts", nargs="+", default=None,
                   help="prompts of the grids (conditional; default: the dataset's first distinct captions)")
    g.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance of the grids, as diffusion.py samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = p.parse_args(argv)
    pooled = args.conditional if args.pooled_text_embed is None else args.pooled_text_embed
    repa_layer = args.repa_layer or ("middle" if args.repa_weight else None)
    return argparse.Namespace(**{**vars(args), "pooled_text_embed": pooled, "repa_layer": repa_layer})


def with_device_defaults(args, device):
    """A copy of `args` with the defaults that depend on the device filled in: --bf16 where bf16 pays."""
    return argparse.Namespace(**{**vars(args), "bf16": native_bf16(device) if args.bf16 is None else args.bf16})


def unet_overrides(args):
    """The UNet settings the command line overrides: {name: value} for the UNET_OVERRIDES given."""
    return {name: getattr(args, name) for name in UNET_OVERRIDES if getattr(args, name) is not None}


def caption_settings(args):
    """How a conditional run's captions are made and encoded (None for an unconditional run): the latent cache's
    caption identity."""
    if not args.conditional:
        return None
    return {"column": args.caption_column, "template": args.caption_template, "text_encoder": args.text_encoder,
            "max_text_length": args.max_text_length}


def noise_schedule(args):
    return NoiseSchedule(args.schedule, args.num_train_timesteps, args.beta_start, args.beta_end,
                         args.zero_terminal_snr)


def lr_schedule_of(args):
    """step -> multiplier of --lr under the command line's warm-up and schedule."""
    return functools.partial(lr_factor, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                             lr_schedule=args.lr_schedule, floor=args.min_lr / args.lr)


def loss_settings(args):
    """The keyword arguments of diffusion_loss that the command line sets."""
    return {"prediction_type": args.prediction_type, "min_snr_gamma": args.min_snr_gamma, "cond_drop": args.cond_drop,
            "timestep_sampling": args.timestep_sampling, "timestep_loc": args.timestep_loc,
            "timestep_scale": args.timestep_scale, "repa_layer": args.repa_layer}


def run_identity(args, vqgan_digest, resolution, embeddings_digest=None):
    """The settings that give a checkpoint its meaning (flag name -> value): --resume refuses a checkpoint saved
    under others. The beta range is the one in effect (its default where unset; none for cosine, which has no
    range); the VQGAN is its weights' digest, the --image_embeddings cache `embeddings_digest` (None without one).
    Settings missing here (--lr, --max_steps, intervals, ...) may change on resume; the UNet's architecture is
    checked by check_same_architecture."""
    beta_range = [None, None]
    if args.schedule != "cosine":
        betas = make_betas(args.schedule, args.num_train_timesteps, args.beta_start, args.beta_end)
        beta_range = [round(betas[0].item(), 12), round(betas[-1].item(), 12)]
    captions = ("caption_column", "caption_template", "text_encoder", "max_text_length", "cond_drop")
    return dict(vqgan_ckpt=vqgan_digest[:16], resolution=resolution, schedule=args.schedule,
                num_train_timesteps=args.num_train_timesteps, beta_start=beta_range[0], beta_end=beta_range[1],
                zero_terminal_snr=args.zero_terminal_snr,
                prediction_type=args.prediction_type, min_snr_gamma=args.min_snr_gamma, seed=args.seed,
                batch_size=args.batch_size, grad_accum=args.grad_accum, conditional=args.conditional,
                **{name: getattr(args, name) if args.conditional else None for name in captions},
                image_embeddings=embeddings_digest and embeddings_digest[:16],
                image_embed_lr_scale=args.image_embed_lr_scale if args.image_embeddings else None,
                **lever_identity(args))


def lever_identity(args):
    """The training levers in the run identity (older checkpoints lack them: taken as unchanged, i.e. off). The
    REPA settings count only with REPA on; --repa_weight and --repa_until may change on resume."""
    repa = ("repa_layer", "repa_image_size", "repa_channels")
    return dict(timestep_sampling=args.timestep_sampling, timestep_loc=args.timestep_loc,
                timestep_scale=args.timestep_scale,
                **{name: getattr(args, name) if args.repa_weight else None for name in repa})


def check_args(args):
    if (args.dataset_path is None) == (args.packed_latents is None):
        raise UserError("give exactly one of --dataset_path and --packed_latents")
    if args.packed_latents and args.repa_weight:
        raise UserError("--repa_weight needs --dataset_path: packed latents carry no REPA targets")
    make_betas(args.schedule, args.num_train_timesteps, args.beta_start, args.beta_end)  # before the latent cache
    if not 0 <= args.cond_drop < 1:
        raise UserError(f"--cond_drop must be in [0, 1), got {args.cond_drop}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    check_lever_args(args)
    if args.zero_terminal_snr and args.prediction_type != "v":
        raise UserError("--zero_terminal_snr needs --prediction_type v (an epsilon model cannot sample from pure "
                        "noise)")
    captioned = args.caption_column is not None or args.caption_template is not None
    if args.conditional and (args.caption_column is None) == (args.caption_template is None):
        raise UserError("--conditional needs exactly one of --caption_column and --caption_template")
    if not args.conditional and (captioned or args.sample_prompts or args.text_embeddings or args.pooled_text_embed):
        raise UserError("--caption_column, --caption_template, --sample_prompts, --text_embeddings and "
                        "--pooled_text_embed need --conditional")


def check_lever_args(args):
    """The training levers: a location or scale needs a focused sampling; REPA settings need --repa_weight (with
    it, parse_args has filled in --repa_layer's default, middle)."""
    if args.timestep_sampling == "uniform" and (args.timestep_loc is not None or args.timestep_scale is not None):
        raise UserError("--timestep_loc and --timestep_scale need --timestep_sampling logit-normal or laplace")
    if not args.repa_weight and (args.repa_layer is not None or args.repa_until is not None):
        raise UserError("--repa_layer and --repa_until need --repa_weight")
    if args.repa_image_size < 64 or args.repa_image_size % 32:
        raise UserError(f"--repa_image_size must be a multiple of 32 of at least 64, got {args.repa_image_size}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world_size, device = setup_distributed(args.device)
    try:
        return train(with_device_defaults(args, device), rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
