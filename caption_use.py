"""How much a text-conditioned model's captions steer its denoising, against how much they could.

At each noise level t, noisy latents x_t are made from held-out paintings. The model predicts x0 from each x_t
once per caption; the spread of those predictions across captions is how far the caption moves the image. The
same is computed for the training set's own optimal denoiser, E[x0 | x_t, caption] = the softmax-weighted mean of
that caption's latents, weights exp(-|x_t - sqrt(alpha_bar) x0_i|^2 / (2 (1 - alpha_bar))). Its spread holds what
the captions explain and the noise of averaging finite pools (`pool_images` says how many paintings it averages;
at low noise it memorises). The control: the same denoiser over the same paintings with their captions shuffled
(pools of the same sizes), whose spread is that noise alone; sqrt(optimal^2 - shuffled^2) estimates the part the
captions explain.

Spreads are RMS over latent elements, split into layout (each channel's spatial mean removed: composition) and
palette (the spatial means: colour).

The same split then measures the per-caption grid itself, drawn as diffusion.py draws it (every caption from the
same start noise for each seed, the sampling flags as there): the layout spread of the final latents across
captions, against their spread across seeds, the scale of unrelated compositions. A ratio near 0 means every row
of the grid repeats one layout per seed; near 1, a caption changes a seed's composition as much as a new seed does.

    python caption_use.py --model models/unet-cond --data ../shared/wikiart-mini --caption_template "a {style} painting"
"""
import argparse

import torch
from tqdm import tqdm

from checkpoints import atomic_write_json
from cli import ArgumentParser, UserError, check_output_file, positive_int, run_cli
from devices import pick_device
from diffusion import add_sampling_arguments, load_diffusion_model, sampling_options, use_bf16
from images import ImageSource, ImageTensorDataset, collate_skip_none
from schedule import predicted_x0
from text_encoder import dataset_captions

MAX_CAPTIONS = 64


def rows_by_caption(path, split, caption_template):
    """{caption: [row, ...]} of a dataset split, captions made as trainer.py makes them."""
    groups = {}
    for row, caption in enumerate(dataset_captions(path, split, caption_template=caption_template)):
        groups.setdefault(caption, []).append(row)
    if not 2 <= len(groups) <= MAX_CAPTIONS:
        raise UserError(f"--caption_template gives {len(groups)} distinct captions; this measure needs 2 to "
                        f"{MAX_CAPTIONS} (a template over a categorical column such as style)")
    return dict(sorted(groups.items()))


@torch.no_grad()
def encode_rows(pipeline, source, rows, resolution, batch_size):
    """Scaled latents N x C x h x w of the centre-cropped images of `rows`."""
    dataset = torch.utils.data.Subset(ImageTensorDataset(source, resolution, random_crop=False, flip=False), rows)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_none)
    latents = [pipeline.encode(images) for images in tqdm(loader, desc="encoding", leave=False) if images is not None]
    return torch.cat(latents)


def layout_and_palette(x):
    """x ... x C x h x w -> (x minus each channel's spatial mean, that mean)."""
    palette = x.mean(dim=(-2, -1), keepdim=True)
    return x - palette, palette


def caption_spread(x0):
    """RMS deviation from the mean over captions of x0 predictions B x S x C x h x w: (layout, palette)."""
    return tuple((part - part.mean(dim=1, keepdim=True)).pow(2).mean().sqrt().item()
                 for part in layout_and_palette(x0))


def optimal_x0(x_t, alpha_bar, pool):
    """The optimal denoiser of the empirical distribution `pool` (N x C x h x w) at x_t (B x C x h x w):
    (E[x0 | x_t] B x C x h x w, the effective number of pool images averaged, mean over B)."""
    scaled = alpha_bar.sqrt() * pool.flatten(1)
    logits = -torch.cdist(x_t.flatten(1).double(), scaled.double()).pow(2) / (2 * (1 - alpha_bar))
    weights = logits.softmax(dim=-1)
    effective = (1 / weights.pow(2).sum(dim=-1)).mean().item()
    return (weights.float() @ pool.flatten(1)).view_as(x_t), effective


def shuffled_pools(pools, seed):
    """The latents of `pools` (a list of N_i x C x h x w) dealt at random into pools of the same sizes."""
    every = torch.cat(pools)
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed)).to(every.device)
    return list(every[order].split([len(pool) for pool in pools]))


def optimal_spread(x_t, alpha_bar, pools):
    """Caption spread (layout, palette) of the optimal denoisers of `pools` at x_t, and the mean effective number
    of pool images they average."""
    optimal = [optimal_x0(x_t, alpha_bar, pool) for pool in pools]
    return caption_spread(torch.stack([x0 for x0, _ in optimal], dim=1)), sum(n for _, n in optimal) / len(optimal)


@torch.no_grad()
def model_x0(pipeline, x_t, t, context, mask):
    """The model's x0 prediction for every (latent, caption) pair: B x S x C x h x w, S = len(context)."""
    B, S = len(x_t), len(context)
    x = x_t.repeat_interleave(S, dim=0)
    timesteps = torch.full((B * S,), t, device=x.device)
    out = pipeline.unet(x, timesteps, context.repeat(B, 1, 1), mask.repeat(B, 1)).float()
    return predicted_x0(x, out, pipeline.schedule.alpha_bar(timesteps).float(), pipeline.prediction_type).view(
        B, S, *x_t.shape[1:])


def measure(pipeline, pools, probes, timesteps, seed=0):
    """One row per timestep: the model's and the optimal denoiser's caption spreads (layout, palette) at x_t made
    from `probes` (B x C x h x w) with noise from `seed`, and the optimal denoiser's with the captions shuffled
    (the same seed). pools: {caption: latents N x C x h x w}."""
    context, mask = pipeline.text_encoder.encode(list(pools))
    noise = torch.randn(probes.shape, generator=torch.Generator().manual_seed(seed)).to(probes.device)
    shuffled = shuffled_pools(list(pools.values()), seed)
    rows = []
    for t in timesteps:
        alpha_bar = pipeline.schedule.alpha_bar(torch.tensor(float(t)))
        x_t = pipeline.schedule.q_sample(probes, torch.full((len(probes),), float(t)), noise).float()
        model = caption_spread(model_x0(pipeline, x_t, t, context, mask))
        data, pool_images = optimal_spread(x_t, alpha_bar, pools.values())
        control, _ = optimal_spread(x_t, alpha_bar, shuffled)
        rows.append({"t": t, "sigma": ((1 - alpha_bar) / alpha_bar).sqrt().item(),
                     "model_layout": model[0], "model_palette": model[1],
                     "optimal_layout": data[0], "optimal_palette": data[1],
                     "shuffled_layout": control[0], "shuffled_palette": control[1],
                     "explained_layout": max(data[0] ** 2 - control[0] ** 2, 0) ** 0.5,
                     "layout_ratio": model[0] / data[0] if data[0] else float("nan"),
                     "pool_images": pool_images})
    return rows


@torch.no_grad()
def grid_spread(pipeline, captions, num_seeds, seed=0, **sampling):
    """Layout spreads of the grid of `captions` x seeds seed .. seed + num_seeds - 1, each caption sampled from the
    same start noise per seed (Pipeline.sample_latents options): (across captions, across seeds)."""
    latents = torch.stack([pipeline.sample_latents(num_seeds, seed, prompt=caption, progress=False, **sampling)
                           for caption in captions], dim=1).float()  # seeds x captions x C x h x w
    return caption_spread(latents)[0], caption_spread(latents.transpose(0, 1))[0]


def print_rows(rows):
    print("caption spread (RMS over latent elements): layout = composition, palette = colour; ratio = model / "
          "optimal layout; shuffled = the optimal denoiser with the captions shuffled (pool noise alone); explained = "
          "sqrt(optimal^2 - shuffled^2)")
    print(f"{'t':>5} {'sigma':>7} {'layout':>8} {'optimal':>8} {'ratio':>6} {'shuffled':>8} {'explained':>9} "
          f"{'palette':>8} {'optimal':>8} {'shuffled':>8} {'pool images':>11}")
    for r in rows:
        print(f"{r['t']:>5} {r['sigma']:>7.2f} {r['model_layout']:>8.4f} {r['optimal_layout']:>8.4f} "
              f"{r['layout_ratio']:>6.2f} {r['shuffled_layout']:>8.4f} {r['explained_layout']:>9.4f} "
              f"{r['model_palette']:>8.4f} {r['optimal_palette']:>8.4f} {r['shuffled_palette']:>8.4f} "
              f"{r['pool_images']:>11.1f}")


def parse_args(argv):
    parser = ArgumentParser(__file__, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="text-conditioned diffusion checkpoint (.json or its stem)")
    parser.add_argument("--data", required=True, help="dataset folder or hub name, with the captions' columns")
    parser.add_argument("--caption_template", required=True,
                        help='captions as in training, e.g. "a {style} painting"; each distinct caption is one row')
    parser.add_argument("--split", default="train", help="split whose paintings the optimal denoiser averages")
    parser.add_argument("--probe_split", default="test", help="split the noisy latents are made from")
    parser.add_argument("--pool_size", type=positive_int, default=300,
                        help="paintings per caption for the optimal denoiser (the first of each caption's rows)")
    parser.add_argument("--probes", type=positive_int, default=16, help="noisy latents per timestep")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[950, 900, 800, 700, 600, 500, 300],
                        help="noise levels to measure at")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="image size encoded (default: the model's latent size times the VQGAN's factor)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise, of the probe choice and of the grid's first image")
    parser.add_argument("--grid_seeds", type=int, default=8,
                        help="grid columns (seeds) for the grid measure, at least 2; 0 skips it")
    add_sampling_arguments(parser)
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images encoded per batch")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.out:
        check_output_file(args.out, "--out")
    if args.grid_seeds < 0 or args.grid_seeds == 1:
        raise UserError(f"--grid_seeds must be 0 (no grid measure) or at least 2 (a spread across seeds), got "
                        f"{args.grid_seeds}")
    options = sampling_options(args)
    device = pick_device(args.device)
    pipeline = load_diffusion_model(args.model, device, bf16=use_bf16(args.precision, device))
    if not pipeline.conditional:
        raise UserError(f"{args.model} is unconditional: there are no captions to measure")
    steps = pipeline.schedule.num_train_timesteps
    if not all(0 <= t < steps for t in args.timesteps):
        raise UserError(f"--timesteps must lie in [0, {steps - 1}], got {args.timesteps}")
    resolution = args.resolution or pipeline.latent_shape[-1] * pipeline.vqgan.downsample_factor
    source, probe_source = ImageSource(args.data, args.split), ImageSource(args.data, args.probe_split)
    pools = {caption: encode_rows(pipeline, source, rows[:args.pool_size], resolution, args.batch_size)
             for caption, rows in rows_by_caption(args.data, args.split, args.caption_template).items()}
    picked = torch.randperm(len(probe_source), generator=torch.Generator().manual_seed(args.seed))[:args.probes]
    probes = encode_rows(pipeline, probe_source, picked.tolist(), resolution, args.batch_size)
    rows = measure(pipeline, pools, probes, args.timesteps, args.seed)
    print_rows(rows)
    result = {"model": str(args.model), "data": str(args.data), "split": args.split, "captions": list(pools),
              "pool_size": args.pool_size, "probes": len(probes), "rows": rows}
    if args.grid_seeds:
        across_captions, across_seeds = grid_spread(pipeline, list(pools), args.grid_seeds, args.seed, **options)
        grid = result["grid"] = {"seeds": args.grid_seeds, "sampling": options, "ratio": across_captions / across_seeds,
                                 "layout_across_captions": across_captions, "layout_across_seeds": across_seeds}
        high = options["guidance_high"]
        guidance = f"guidance {options['guidance_scale']} in sigma {options['guidance_interval']}" + (
            f", {high[0]} above sigma {high[1]}" if high else "")
        print(f"grid of {len(pools)} captions x {args.grid_seeds} seeds ({options['sampler']}, {options['steps']} "
              f"steps, {guidance}): layout spread across captions {across_captions:.4f}, across seeds "
              f"{across_seeds:.4f}, ratio {grid['ratio']:.2f}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
