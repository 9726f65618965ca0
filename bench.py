"""Speed benchmarks for Noise2Art, all in one run on one machine: prints a table and writes JSON.

    python bench.py                       # VQGAN, UNet and sampler timings at the default sizes
    python bench.py --sections unet --unet_size small --batch_size 16

Timings use randomly initialised models (speed does not depend on the weights). Each figure is the
median of --repeats timed runs after one warm-up run. Peak memory is the process's peak resident set
size (CPU) or torch's peak allocation (CUDA) after the section.
"""
import argparse
import resource
import statistics
import time

import torch

from common import atomic_write_json, autocast, pick_device, run_cli
from diffusion import DEFAULT_STEPS, SAMPLERS, NoiseSchedule, make_denoiser, randn, sampling_timesteps
from unet import build_unet, count_parameters
from vqgan import CONFIGS, VQModel


def timed(fn, repeats):
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_vqgan(args, device):
    rows = []
    model = VQModel(CONFIGS[args.vqgan_config]).to(device).eval()
    for resolution in args.vqgan_resolutions:
        images = torch.rand(args.batch_size, 3, resolution, resolution, device=device) * 2 - 1
        with torch.no_grad(), autocast(device, args.bf16):
            latents = model.encode(images)
            encode_s = timed(lambda: model.encode(images), args.repeats)
            decode_s = timed(lambda: model.decode(latents), args.repeats)
        for what, seconds in (("encode", encode_s), ("decode", decode_s)):
            rows.append({"section": "vqgan", "what": f"{args.vqgan_config} {what} {resolution}px",
                         "images_per_s": args.batch_size / seconds, "peak_mb": peak_memory_mb(device)})
    return rows


def bench_unet(args, device):
    rows = []
    unet = build_unet(args.unet_size).to(device)
    n_params = count_parameters(unet) / 1e6
    latents = torch.randn(args.batch_size, 4, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def train_step(bf16):
        with autocast(device, bf16):
            loss = unet(latents, t).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for bf16 in (False, True):
        precision = "bf16" if bf16 else "fp32"
        unet.eval()
        with torch.no_grad(), autocast(device, bf16):
            forward_s = timed(lambda: unet(latents, t), args.repeats)
        unet.train()
        train_s = timed(lambda: train_step(bf16), args.repeats)
        for what, seconds in (("forward", forward_s), ("train step", train_s)):
            rows.append({"section": "unet", "what": f"{args.unet_size} ({n_params:.1f}M) {what} {precision}",
                         "samples_per_s": args.batch_size / seconds, "peak_mb": peak_memory_mb(device)})
    return rows


def bench_samplers(args, device):
    rows = []
    unet = build_unet(args.unet_size).to(device).eval()
    schedule = NoiseSchedule("linear")
    for name in args.samplers:
        steps = DEFAULT_STEPS[name]

        def model_fn(x, t):
            with autocast(device, args.bf16):
                return unet(x, t)

        denoiser = make_denoiser(model_fn, schedule, "epsilon")
        timesteps = sampling_timesteps(schedule, steps)
        noise = randn((args.sample_batch, 4, 32, 32), device=device)
        seconds = timed(lambda: SAMPLERS[name](denoiser, noise, schedule, timesteps), max(1, args.repeats // 3))
        rows.append({"section": "sampler", "what": f"{name}-{steps} {args.unet_size} {'bf16' if args.bf16 else 'fp32'}",
                     "s_per_image": seconds / args.sample_batch, "peak_mb": peak_memory_mb(device)})
    return rows


SECTIONS = {"vqgan": bench_vqgan, "unet": bench_unet, "sampler": bench_samplers}


def print_table(rows):
    print(f"{'section':8s} {'what':44s} {'figure':>22s} {'peak MB':>8s}")
    for row in rows:
        key = next(k for k in ("images_per_s", "samples_per_s", "s_per_image") if k in row)
        print(f"{row['section']:8s} {row['what']:44s} {row[key]:14.2f} {key:>7s} {row['peak_mb']:8.0f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to time")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--batch_size", type=int, default=8, help="batch for VQGAN and UNet timings")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--vqgan_config", default="vq-f4-small", choices=list(CONFIGS), help="VQGAN configuration")
    parser.add_argument("--vqgan_resolutions", type=int, nargs="+", default=[128, 256], help="image sizes to time")
    parser.add_argument("--unet_size", default="small", help="named UNet size (unet.UNET_CONFIGS)")
    parser.add_argument("--samplers", nargs="+", default=["dpmpp-2m", "ddim", "ddpm"], choices=list(SAMPLERS),
                        help="samplers to time at their default steps (ddpm: 1000 steps, slow)")
    parser.add_argument("--sample_batch", type=int, default=4, help="images per sampler run")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the VQGAN and sampler timings")
    parser.add_argument("--out", default="bench.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = []
    for section in args.sections:
        rows += SECTIONS[section](args, device)
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print_table(rows)
    atomic_write_json(args.out, {"device": str(device), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
