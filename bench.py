"""Speed benchmarks for Noise2Art, all in one run on one machine: prints a table and writes JSON.

    python bench.py                       # every section at the default sizes (under 15 minutes on 2 idle CPU cores)
    python bench.py --sections unet --unet_size small --batch_size 16

Sections:
  vqgan      VQGAN encode and decode, images/s.
  unet       UNet forward and plain training step (loss, backward, AdamW), samples/s, in NCHW and channels-last
             layout, fp32 and (where bf16 pays, devices.native_bf16, or with --bf16) bf16.
  train      trainer.py's training step (unet_training.py's make_unet, build_training, train_step, at trainer.py's
             defaults) with the latent cache (latents read from a cache built once by build_latent_cache; only the
             steps are timed) versus without it (each step decodes a batch of JPEG/PNG images from --images and
             encodes it with the frozen VQGAN, then the same step), samples/s, and the cache's speed-up.
  diffusers  our UNet versus diffusers.UNet2DModel configured to match it (same widths, blocks per level,
             attention at the same feature-map sizes, scale-shift time conditioning, head width), forward and
             training step; our DDIM-50 versus diffusers' DDIMScheduler at 50 steps (our schedule and timesteps),
             each driving its own UNet. Its attention blocks lack our feed-forward layers, so it has fewer
             parameters (both counts are printed). Also each forward's work (GFLOP per sample, convolutions and
             matmuls) and the rate it is done at (GFLOP/s): the speed-up of one UNet over another is the ratio
             of their rates divided by the ratio of their work, and a rate near the machine's peak leaves
             little to gain. Needs `pip install diffusers` (optional; skipped without it).
  sampler    seconds per image of each sampler at its default steps, and DPM-Solver++(2M)-20's speed-up over
             DDPM-1000. Samplers with more than --max_sampler_steps steps are timed on their first steps and
             scaled up (each step costs one UNet call), as the row says.
  studio     (only when asked for: it starts a web server) `python studio.py`: seconds from its start to the page
             answering, and from a Generate click at the page's default settings (4 images, empty prompt) to the 4
             images, through gradio_client and the page's queue: the first click, then the median of --repeats.

Timings use randomly initialised models (speed does not depend on the weights). Each figure is the median of
--repeats timed runs after one warm-up run (sampler figures: max(1, repeats // 3) runs after a short warm-up).
Ratios are speed-ups: how many times faster the first named is. Peak memory is per section, from the section's
start to the row: torch's peak allocation on CUDA; elsewhere the peak resident set size of the process (torch
itself included, and memory earlier sections freed but the allocator kept), which Linux lets us reset at each
section start; where it cannot be reset (not Linux) the column is the process's peak so far, as the table's header
says.
"""
import argparse
import itertools
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import latent_cache
import trainer
from checkpoints import atomic_write_json
from cli import ArgumentParser, UserError, positive_int, run_cli
from devices import autocast, native_bf16, pick_device
from images import ImageSource, ImageTensorDataset, collate_skip_none
from samplers import DEFAULT_STEPS, SAMPLERS, make_denoiser, randn, sampling_timesteps
from schedule import NoiseSchedule
from training_loop import batch_rows
from unet import UNET_CONFIGS, build_unet, count_parameters
from unet_training import build_training, make_unet, train_step
from vqgan import CONFIGS, VQModel

WIKIART_MINI = Path(__file__).resolve().parent.parent / "shared" / "wikiart-mini"
LATENT_SHAPE = (4, 32, 32)  # the UNet and sampler sections' latents (vq-f4 at 128 px)


def synchronize():
    """Wait for queued GPU work, so that wall time covers it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats, warmup=None):
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run of `warmup()` (default: `fn()`)."""
    (warmup or fn)()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device):
    """Start a section's peak-memory count. Returns False where the CPU peak cannot be reset (not Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def precision(bf16):
    return "bf16" if bf16 else "fp32"


def ratio_row(section, what, fast, slow):
    """A speed-up row: `fast` over `slow`, both rates (higher is faster)."""
    return {"section": section, "what": what, "ratio": fast / slow, "peak_mb": None}


# ----------------------------------------------------------------------------------------------
# Sections: each returns rows {section, what, one figure (images_per_s, samples_per_s, s_per_image, ratio), peak_mb}


def bench_vqgan(device, config, resolutions, batch_size, bf16, repeats):
    rows = []
    model = VQModel(CONFIGS[config]).to(device).eval()
    for resolution in resolutions:
        images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
        with torch.no_grad(), autocast(device, bf16):
            latents = model.encode(images)
            encode_s = timed(lambda: model.encode(images), repeats)
            decode_s = timed(lambda: model.decode(latents), repeats)
        for what, seconds in (("encode", encode_s), ("decode", decode_s)):
            label = f"{config} {what} {resolution}px {precision(bf16)}"
            rows.append({"section": "vqgan", "what": label, "images_per_s": batch_size / seconds,
                         "peak_mb": peak_memory_mb(device)})
    return rows


def time_unet(model, forward, batch_size, bf16, device, repeats):
    """(forward seconds, training-step seconds) of `forward(x, t)` (a B x C x h x w prediction) on a batch of random
    latents; the training step is a squared-output loss, backward and an AdamW step."""
    latents = torch.randn(batch_size, *LATENT_SHAPE, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with autocast(device, bf16):
            loss = forward(latents, t).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        forward_s = timed(lambda: forward(latents, t), repeats)
    model.train()
    train_s = timed(train_step, repeats)
    model.eval()
    return forward_s, train_s


def bench_unet(device, unet_size, batch_size, bf16, repeats):
    rows = []
    unet = build_unet(unet_size).to(device)
    n_params = count_parameters(unet) / 1e6
    precisions = (False, True) if bf16 or native_bf16(device) else (False,)  # emulated bf16: ~100x slower
    for layout, in_bf16 in itertools.product((torch.contiguous_format, torch.channels_last), precisions):
        unet.to(memory_format=layout)  # trainer.py --channels_last, diffusion.py's default
        forward_s, train_s = time_unet(unet, unet, batch_size, in_bf16, device, repeats)
        suffix = ", channels-last" if layout == torch.channels_last else ""
        for what, seconds in (("forward", forward_s), ("train step", train_s)):
            rows.append({"section": "unet",
                         "what": f"{unet_size} ({n_params:.1f}M) {what} {precision(in_bf16)}{suffix}",
                         "samples_per_s": batch_size / seconds, "peak_mb": peak_memory_mb(device)})
    return rows


def write_synthetic_images(folder, count):
    """`count` 224x168 JPEGs (smooth random colours, the size of a WikiArt-mini painting) in `folder`."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        coarse.resize((224, 168), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)


def bench_train(device, unet_size, vqgan_config, batch_size, bf16, repeats, images, training, step, seed):
    """trainer.py's training step on cached latents versus on images decoded and encoded at every step. images: what
    to decode (None: ../shared/wikiart-mini where it is, else synthetic JPEGs); training, step, seed: build_training's
    and train_step's keywords and the data order's seed as trainer.py's defaults make them (trainer_settings)."""
    with tempfile.TemporaryDirectory() as tmp:
        images_path, images_name = images, images
        if images_path is None and (WIKIART_MINI / "data").is_dir():
            images_path, images_name = WIKIART_MINI, "wikiart-mini"
        elif images_path is None:
            images_path, images_name = tmp, "synthetic JPEGs"
            write_synthetic_images(Path(tmp), 2 * batch_size)
        source = ImageSource(images_path)
        rows = [i % len(source) for i in range(2 * batch_size)]  # two full batches, repeating a small source
        vqgan = VQModel(CONFIGS[vqgan_config]).to(device).eval().requires_grad_(False)
        resolution = vqgan.config["resolution"]
        unet = make_unet(unet_size, vqgan.config["embed_dim"], resolution // vqgan.downsample_factor, None)
        run = build_training(unet, device, **training)
        n_params = count_parameters(unet) / 1e6
        cache = latent_cache.build_latent_cache(source, rows, vqgan, resolution, batch_size, device, bf16,
                                                progress=False)
        num_rows, positions = len(cache["latents"]), itertools.count(0, batch_size)

        def step_with_cache():
            rows_now = batch_rows(num_rows, batch_size, seed, next(positions))
            train_step(run, [latent_cache.cache_batch(cache, rows_now, device)], **step)

        dataset = ImageTensorDataset(source, resolution, random_crop=False, flip=True)  # the cache's crop and flips
        batches = itertools.cycle([rows[i:i + batch_size] for i in range(0, len(rows), batch_size)])

        def step_without_cache():
            pixels = collate_skip_none([dataset[row] for row in next(batches)]).to(device)
            with torch.no_grad(), autocast(device, bf16):
                latents = vqgan.encode(pixels).float() * cache["latent_scale"]
            train_step(run, [(latents, None, None, None, None)], **step)

        with_cache_s = timed(step_with_cache, repeats)
        without_cache_s = timed(step_without_cache, repeats)
    what = f"{unet_size} ({n_params:.1f}M) train_step {precision(bf16)}"
    with_cache = batch_size / with_cache_s
    without_cache = batch_size / without_cache_s
    peak = peak_memory_mb(device)
    return [{"section": "train", "what": f"{what}, latent cache", "samples_per_s": with_cache, "peak_mb": peak},
            {"section": "train", "what": f"{what}, decode {images_name} + {vqgan_config} encode {resolution}px",
             "samples_per_s": without_cache, "peak_mb": peak},
            ratio_row("train", "latent cache speed-up (target >= 3x)", with_cache, without_cache)]


def sampler_seconds(unet, name, steps, device, bf16=False, sample_batch=1, max_steps=None, repeats=3):
    """Seconds per image of our sampler `name` at `steps` steps driving `unet` (`sample_batch` images per run, the
    best of `repeats` // 3 runs), and the number of steps timed: at most `max_steps`, the first ones, scaled up to
    `steps`."""
    schedule = NoiseSchedule("linear")

    def model_fn(x, t):
        with autocast(device, bf16):
            return unet(x, t)

    denoiser = make_denoiser(model_fn, schedule, "epsilon")
    timesteps = sampling_timesteps(schedule, steps)[:max_steps]
    noise = randn((sample_batch, *LATENT_SHAPE), device=device)
    seconds = timed(lambda: SAMPLERS[name](denoiser, noise, schedule, timesteps), max(1, repeats // 3),
                    warmup=lambda: SAMPLERS[name](denoiser, noise, schedule, timesteps[:2]))
    return seconds * steps / len(timesteps) / sample_batch, len(timesteps)


def forward_gflop(forward, device):
    """GFLOP of one sample's forward pass, as torch.utils.flop_counter counts them: convolutions and matrix
    products (attention kernels on CPU are not counted; both UNets have the same attention)."""
    latents, t = torch.randn(1, *LATENT_SHAPE, device=device), torch.tensor([500], device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(latents, t)
    return counter.get_total_flops() / 1e9


def diffusers_unet(config):
    """diffusers.UNet2DModel matched to our UNet's config: widths model_channels x channel_mult, num_res_blocks per
    level, attention blocks at the same feature-map sizes (and in the middle), scale-shift time conditioning,
    GroupNorm(32, eps 1e-6). UNet2DModel takes one head width for every block: the middle block's."""
    from diffusers import UNet2DModel

    widths = [config["model_channels"] * mult for mult in config["channel_mult"]]
    attention = [config["sample_size"] // 2**level in config["attention_resolutions"] for level in range(len(widths))]
    return UNet2DModel(
        sample_size=config["sample_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
        block_out_channels=widths, layers_per_block=config["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        attention_head_dim=widths[-1] // config["num_heads"], resnet_time_scale_shift="scale_shift", norm_eps=1e-6,
        dropout=config["dropout"])


def bench_diffusers(device, unet_size, batch_size, bf16, repeats, timing):
    """Our UNet and DDIM against diffusers'; timing: sampler_seconds' keywords (sampler_timing)."""
    try:
        import diffusers
    except ImportError:
        print("diffusers: not installed, section skipped (pip install diffusers to compare with it)")
        return []
    ours = build_unet(unet_size).to(device)
    theirs = diffusers_unet(ours.config).to(device)
    names = {"ours": f"ours {unet_size} ({count_parameters(ours) / 1e6:.1f}M)",
             "theirs": f"diffusers {diffusers.__version__} UNet2DModel ({count_parameters(theirs) / 1e6:.1f}M)"}
    forwards = {"ours": ours, "theirs": lambda x, t: theirs(x, t).sample}
    models = {"ours": ours, "theirs": theirs}
    rates = {}
    rows = []
    for who in ("ours", "theirs"):
        forward_s, train_s = time_unet(models[who], forwards[who], batch_size, bf16, device, repeats)
        for what, seconds in (("forward", forward_s), ("train step", train_s)):
            rates[who, what] = batch_size / seconds
            rows.append({"section": "diffusers", "what": f"{names[who]} {what} {precision(bf16)}",
                         "samples_per_s": rates[who, what], "peak_mb": peak_memory_mb(device)})
    rows += [ratio_row("diffusers", f"{what} speed-up ours/diffusers", rates["ours", what], rates["theirs", what])
             for what in ("forward", "train step")]
    for who in ("ours", "theirs"):  # how much work each forward is, and how fast it is done
        gflop = forward_gflop(forwards[who], device)
        rows += [{"section": "diffusers", "what": f"{names[who]} forward work (convolutions + matmuls)",
                  "gflop_per_sample": gflop, "peak_mb": None},
                 {"section": "diffusers", "what": f"{names[who]} forward rate {precision(bf16)}",
                  "gflop_per_s": gflop * rates[who, "forward"], "peak_mb": None}]

    steps = DEFAULT_STEPS["ddim"]
    schedule = NoiseSchedule("linear")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=schedule.num_train_timesteps,
                                        trained_betas=schedule.betas.numpy(), clip_sample=False,
                                        timestep_spacing="linspace")  # our schedule and timesteps
    noise = randn((timing["sample_batch"], *LATENT_SHAPE), device=device)

    @torch.no_grad()
    def diffusers_ddim(num_steps):
        scheduler.set_timesteps(num_steps)
        x = noise
        for t in scheduler.timesteps:
            with autocast(device, bf16):
                eps = theirs(x, t.to(device)).sample
            x = scheduler.step(eps.float(), t, x).prev_sample
        return x

    theirs.eval()
    seconds = {"ours": sampler_seconds(ours, "ddim", steps, device, **timing)[0],
               "theirs": timed(lambda: diffusers_ddim(steps), max(1, repeats // 3),
                               warmup=lambda: diffusers_ddim(2)) / timing["sample_batch"]}
    for who, label in (("ours", f"our ddim-{steps}"), ("theirs", f"DDIMScheduler-{steps}")):
        rows.append({"section": "diffusers", "what": f"{label}, {names[who]} {precision(bf16)}",
                     "s_per_image": seconds[who], "peak_mb": peak_memory_mb(device)})
    rows.append(ratio_row("diffusers", f"ddim-{steps} speed-up ours/diffusers", 1 / seconds["ours"],
                          1 / seconds["theirs"]))
    return rows


def bench_samplers(device, unet_size, samplers, timing):
    """Each of `samplers` at its default steps; timing: sampler_seconds' keywords (sampler_timing)."""
    rows = []
    unet = build_unet(unet_size).to(device).eval()
    seconds = {}
    for name in samplers:
        steps = DEFAULT_STEPS[name]
        seconds[name], timed_steps = sampler_seconds(unet, name, steps, device, **timing)
        scaled = f" (timed on {timed_steps} steps, scaled)" if timed_steps < steps else ""
        rows.append({"section": "sampler", "what": f"{name}-{steps} {unet_size} {precision(timing['bf16'])}{scaled}",
                     "s_per_image": seconds[name], "peak_mb": peak_memory_mb(device)})
    if {"dpmpp-2m", "ddpm"} <= set(seconds):
        rows.append(ratio_row("sampler", f"dpmpp-2m-{DEFAULT_STEPS['dpmpp-2m']} speed-up over "
                              f"ddpm-{DEFAULT_STEPS['ddpm']} (target >= 40x)", 1 / seconds["dpmpp-2m"],
                              1 / seconds["ddpm"]))
    return rows


def cli_seconds(num_images, checkpoint, device):
    """Wall time of `python diffusion.py --num_images N` (the default command; start-up, sampling, decoding and PNG
    writing included) into a temporary folder."""
    with tempfile.TemporaryDirectory() as outdir:
        command = [sys.executable, str(Path(__file__).resolve().parent / "diffusion.py"), "--num_images",
                   str(num_images), "--outdir", outdir, "--device", str(device)]
        command += ["--unet_ckpt_path", checkpoint] if checkpoint else []
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise UserError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def bench_cli(device, images, checkpoint):
    """The default command end to end (`checkpoint`: its --unet_ckpt_path, None for the bundled model): per image
    with start-up (FEW images), and without it: (time for MANY images - time for FEW) / (MANY - FEW), images = (FEW,
    MANY)."""
    few, many = images
    few_seconds, many_seconds = (cli_seconds(n, checkpoint, device) for n in (few, many))
    label = "python diffusion.py" + (f" --unet_ckpt_path {checkpoint}" if checkpoint else "")
    return [{"section": "cli", "what": f"{label}: {few} images, start-up included", "s_per_image": few_seconds / few,
             "peak_mb": None},
            {"section": "cli", "what": f"{label}: per image, start-up excluded (({many} - {few} images) / "
                                       f"{many - few})",
             "s_per_image": (many_seconds - few_seconds) / (many - few), "peak_mb": None}]


def bench_studio(device, unet, repeats):
    """`python studio.py` (bundled models, or `unet`: its --unet) started in the background: seconds to the page
    answering, then seconds per click on Generate at the page's defaults (the median of `repeats` after the first),
    as gradio_client sees them."""
    import studio  # gradio: imported only for this section
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        port = studio.free_port()
        url = f"http://127.0.0.1:{port}/"
        command = [sys.executable, str(Path(studio.__file__)), "--port", str(port), "--outdir", f"{tmp}/out",
                   "--device", str(device)] + (["--unet", unet] if unet else [])
        start = time.perf_counter()
        server = subprocess.Popen(command, env={**os.environ, "GRADIO_TEMP_DIR": f"{tmp}/gradio"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            studio.wait_until_served(url, server, timeout=600)
            start_up = time.perf_counter() - start
            client = Client(url, download_files=f"{tmp}/downloads", verbose=False)
            first = timed(lambda: client.predict(api_name="/generate"), 1, warmup=lambda: None)
            later = timed(lambda: client.predict(api_name="/generate"), repeats, warmup=lambda: None)
        finally:
            server.terminate()
            server.wait(timeout=60)
    label = "python studio.py" + (f" --unet {unet}" if unet else "")
    return [{"section": "studio", "what": f"{label}: start to page served", "seconds": start_up, "peak_mb": None},
            {"section": "studio", "what": f"{label}: first Generate click to 4 images (defaults)", "seconds": first,
             "peak_mb": None},
            {"section": "studio", "what": f"{label}: later clicks to 4 images, median of {repeats}",
             "seconds": later, "peak_mb": None}]


SECTIONS = {"vqgan": bench_vqgan, "unet": bench_unet, "train": bench_train, "diffusers": bench_diffusers,
            "sampler": bench_samplers, "cli": bench_cli, "studio": bench_studio}
ON_REQUEST = ("studio",)  # not in the default run: it starts a web server
FIGURES = {"images_per_s": "img/s", "samples_per_s": "samples/s", "s_per_image": "s/image", "ratio": "x",
           "gflop_per_sample": "GFLOP/samp", "gflop_per_s": "GFLOP/s", "seconds": "s"}


def print_table(rows, memory):
    print(f"{'section':9s} {'what':78s} {'figure':>20s} {'peak MB':>8s}  ({memory})")
    for row in rows:
        key = next(k for k in FIGURES if k in row)
        peak = "" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
        print(f"{row['section']:9s} {row['what']:78s} {row[key]:10.3f} {FIGURES[key]:>9s} {peak:>8s}")


# ----------------------------------------------------------------------------------------------
# Command line: parse_args, then the readers that turn its flags into each section's explicit arguments


def parse_args(argv):
    parser = ArgumentParser(__file__, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=[s for s in SECTIONS if s not in ON_REQUEST],
                        choices=list(SECTIONS), help=f"what to time (default: all but {', '.join(ON_REQUEST)})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--batch_size", type=positive_int, default=8,
                        help="batch of the vqgan, unet, train and diffusers UNet timings (default: 8)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed runs per figure, median reported (default: 3)")
    parser.add_argument("--vqgan_config", default="vq-f4-small", choices=list(CONFIGS),
                        help="VQGAN configuration of the vqgan and train sections (default: vq-f4-small)")
    parser.add_argument("--vqgan_resolutions", type=positive_int, nargs="+", default=[128, 256],
                        help="image sizes of the vqgan section (default: 128 256)")
    parser.add_argument("--unet_size", default="small", choices=list(UNET_CONFIGS),
                        help="named UNet size, unet.UNET_CONFIGS (default: small)")
    parser.add_argument("--images", default=None,
                        help="images the train section decodes (a folder or dataset ImageSource reads; default: "
                             "../shared/wikiart-mini when present, else synthetic JPEGs in a temporary folder)")
    parser.add_argument("--samplers", nargs="+", default=["dpmpp-2m", "ddim", "ddpm"], choices=list(SAMPLERS),
                        help="samplers to time at their default steps (default: dpmpp-2m ddim ddpm)")
    parser.add_argument("--max_sampler_steps", type=positive_int, default=100,
                        help="samplers with more steps (ddpm: 1000) are timed on this many and scaled (default: 100)")
    parser.add_argument("--sample_batch", type=positive_int, default=4, help="images per sampler run (default: 4)")
    parser.add_argument("--cli_images", type=positive_int, nargs=2, default=[16, 48], metavar=("FEW", "MANY"),
                        help="image counts of the cli section's two runs of the default command (default: 16 48)")
    parser.add_argument("--cli_checkpoint", default=None,
                        help="diffusion checkpoint of the cli section (default: the bundled unconditional model)")
    parser.add_argument("--studio_unet", default=None,
                        help="diffusion checkpoint of the studio section (default: the bundled models)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast in the vqgan, train, diffusers and sampler sections; unet times both fp32 "
                             "and bf16 with it or where bf16 is native, fp32 alone elsewhere")
    parser.add_argument("--out", default="bench.json", help="JSON file for the results (default: bench.json)")
    args = parser.parse_args(argv)
    if not args.cli_images[0] < args.cli_images[1]:
        raise UserError(f"--cli_images needs FEW < MANY, got {args.cli_images}")
    return args


def sampler_timing(args):
    """sampler_seconds' keywords from the command line: bf16, --sample_batch, --max_sampler_steps, --repeats."""
    return dict(bf16=args.bf16, sample_batch=args.sample_batch, max_steps=args.max_sampler_steps, repeats=args.repeats)


def trainer_settings(unet_size, batch_size, bf16):
    """What trainer.py's defaults make of a run of `unet_size` at `batch_size`, read through its own parser and
    readers, so the train section times the step a default run takes: (build_training's keywords after the UNet and
    device, train_step's keywords after the run and batches, the data order's seed)."""
    args = trainer.parse_args(["--dataset_path", "unused", "--vqgan_ckpt", "unused", "--unet_size", unet_size,
                               "--batch_size", str(batch_size), "--bf16" if bf16 else "--no-bf16"])
    training = dict(schedule=trainer.noise_schedule(args), lr=args.lr, lr_multiplier=trainer.lr_schedule_of(args),
                    weight_decay=args.weight_decay)
    step = dict(loss_settings=trainer.loss_settings(args), bf16=args.bf16, grad_clip=args.grad_clip,
                max_ema_decay=args.ema_decay)
    return training, step, args.seed


def section_arguments(args, section):
    """The explicit arguments of `section` (SECTIONS) from the command line, its device apart."""
    if section == "vqgan":
        return dict(config=args.vqgan_config, resolutions=args.vqgan_resolutions, batch_size=args.batch_size,
                    bf16=args.bf16, repeats=args.repeats)
    if section == "unet":
        return dict(unet_size=args.unet_size, batch_size=args.batch_size, bf16=args.bf16, repeats=args.repeats)
    if section == "train":
        training, step, seed = trainer_settings(args.unet_size, args.batch_size, args.bf16)
        return dict(unet_size=args.unet_size, vqgan_config=args.vqgan_config, batch_size=args.batch_size,
                    bf16=args.bf16, repeats=args.repeats, images=args.images, training=training, step=step, seed=seed)
    if section == "diffusers":
        return dict(unet_size=args.unet_size, batch_size=args.batch_size, bf16=args.bf16, repeats=args.repeats,
                    timing=sampler_timing(args))
    if section == "sampler":
        return dict(unet_size=args.unet_size, samplers=args.samplers, timing=sampler_timing(args))
    if section == "cli":
        return dict(images=args.cli_images, checkpoint=args.cli_checkpoint)
    return dict(unet=args.studio_unet, repeats=args.repeats)  # studio


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    rows, resettable = [], True
    for section in args.sections:
        resettable &= reset_peak_memory(device)
        rows += SECTIONS[section](device, **section_arguments(args, section))
    memory = "peak per section" if resettable else "process peak so far"
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print_table(rows, memory)
    atomic_write_json(args.out, {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "peak_mb": memory, "args": vars(args), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
