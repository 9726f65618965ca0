"""The embedding prior: a small diffusion model over image embeddings (Li, Katabi & He 2023, RCG's "RDM"; Ramesh et
al. 2022, unCLIP's prior), so that a UNet conditioned on an image embedding can sample without being given an image.

It reads an embedding cache (image_embedding.py): NAME.safetensors with "embeddings", N x D (one per painting), and
NAME.json with {"dim": D, "captions": N strings or null}. The prior is a residual MLP
denoiser (v prediction), optionally conditioned on a caption's mean token embedding (with a learned null vector for
classifier-free guidance), that samples with samplers.py's samplers. The non-parametric prior it is measured
against draws a random training embedding and adds Gaussian noise (--evaluate prints both, with a Gaussian baseline:
on whitened embeddings FD alone cannot tell a Gaussian from the data).

    python prior.py --embeddings runs/embeddings/cache --out runs/prior/prior
    python prior.py --embeddings runs/embeddings/cache --out runs/prior/prior-style --conditional
    python prior.py --evaluate runs/prior/prior --embeddings runs/embeddings/cache --reference runs/test-emb/cache

Checkpoint: OUT.safetensors (EMA weights) + OUT.json {"model": "noise2art-embedding-prior", "prior": the config
EmbeddingPrior(**config) rebuilds it from (dim, width, depth, context_dim, text_encoder, schedule, prediction_type),
"conditional", "weights": "ema", "embeddings": {path, sha256, paintings, holdout, holdout_seed}, "training": {flags,
steps, loss, seconds}}. Training state for --resume: OUT-checkpoints/step_NNNNNNN (checkpoints.save_state_dir).
"""
import collections
import copy
import math
import time

import numpy as np
import torch
from torch import nn

from checkpoints import (
    check_run_identity, checkpoint_path, file_digest, load_model, load_resume, load_weights, model_paths,
    prune_checkpoints, save_model, save_state_dir,
)
from cli import (
    ArgumentParser, UserError, at_least, check_output_file, non_negative_float, non_negative_int, positive_float,
    positive_int, run_cli,
)
from devices import pick_device
from image_embedding import load_embedding_cache
from metrics import frechet_distance, kid, mean_and_covariance
from samplers import DEFAULT_KARRAS, SAMPLERS, guided_model_fn, make_denoiser, randn, sampling_timesteps
from schedule import NoiseSchedule, check_prediction_type
from training_loop import StopSignal, batch_rows, ema_decay, lr_factor, update_ema
from unet import mean_token, timestep_embedding, zero_module

MODEL_NAME = "noise2art-embedding-prior"
# DDPM's linear schedule, 1000 steps, and v prediction (Salimans & Ho 2022). An eps-predicting model's x0 is
# (x_t - sqrt(1 - a) eps) / sqrt(a): its error grows as 1 / sqrt(alpha_bar) at the noisy end, 640x at the cosine
# schedule's last step, where a deterministic sampler starts. v gives x0 = sqrt(a) x_t - sqrt(1 - a) v, bounded
# everywhere (RCG's RDM predicts x0 for the same reason). Measured on a synthetic whitened cache (8 Gaussian clusters,
# D = 64, 9,000 paintings and their mirror images for training, 1,000 held out; width 256, depth 4, 2,000 steps),
# 2,000 ddim-50
# samples against the held-out: eps/cosine FD 1.4e8 (diverges); eps/linear FD 57.9; v/cosine FD 0.47, KID 0.0079;
# v/linear FD 0.38, KID 0.0022 (the training rows themselves: 0.51, 0.0101). With ancestral ddpm-250 sampling eps/linear
# also works (FD 0.57), at 5x the steps.
DEFAULT_SCHEDULE = {"kind": "linear", "num_train_timesteps": 1000}
DEFAULT_PREDICTION = "v"
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
# Guidance trades recall for precision. On the synthetic cache with one caption per cluster (a conditional prior,
# 1,500 steps, samples under the held-out paintings' captions): scale 1 FD 0.22, precision 0.38, recall 0.64; scale 2
# FD 0.30, 0.47, 0.40; scale 4 FD 0.73, 0.52, 0.10. 1 (the conditional prediction alone, one forward pass) until
# --evaluate on a real cache says otherwise.
DEFAULT_GUIDANCE_SCALE = 1.0
DEFAULT_NOISE_STDS = (0.1, 0.3)


# ----------------------------------------------------------------------------------------------
# Embedding caches


def split_paintings(num_paintings, holdout, seed):
    """(training painting ids, held-out painting ids), sorted: `holdout` paintings drawn by torch.Generator(seed)."""
    if holdout >= num_paintings:
        raise UserError(f"--holdout {holdout} leaves no training paintings (the cache holds {num_paintings})")
    order = torch.randperm(num_paintings, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def rows_of(embeddings, captions, paintings):
    """(vectors P x D, their captions or None) of the paintings `paintings`."""
    return embeddings[paintings], None if captions is None else [captions[i] for i in paintings.tolist()]


# ----------------------------------------------------------------------------------------------
# The model


class PriorBlock(nn.Module):
    """RCG's RDM block: h + W2 SiLU(LN(W1 SiLU(LN(h)) + E SiLU(emb))), W2 zero at first (the block is the identity)."""

    def __init__(self, width, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, width))
        self.out_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), zero_module(nn.Linear(width, width)))

    def forward(self, h, emb):  # h: B x width, emb: B x emb_dim
        return h + self.out_layers(self.in_layers(h) + self.emb_layers(emb))


class EmbeddingPrior(nn.Module):
    """v-prediction (or eps) over D-dim embeddings: input Linear, `depth` PriorBlocks with the timestep embedding
    (sinusoidal -> MLP) and, for a conditional prior (`context_dim`), the caption's mean token embedding (-> MLP)
    added, then LayerNorm/SiLU/Linear back to D. It runs on normalised embeddings, (x - data_mean) / data_std with the
    training set's statistics (buffers; about the identity on a whitened cache); sample_embeddings undoes that."""

    def __init__(self, dim, width=256, depth=4, context_dim=None, text_encoder=None, schedule=None,
                 prediction_type=DEFAULT_PREDICTION):
        super().__init__()
        check_prediction_type(prediction_type)
        self.config = dict(dim=dim, width=width, depth=depth, context_dim=context_dim, text_encoder=text_encoder,
                           schedule=dict(schedule or DEFAULT_SCHEDULE), prediction_type=prediction_type)
        self.dim, self.width, self.context_dim = dim, width, context_dim
        self.schedule = NoiseSchedule(**self.config["schedule"])
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        if context_dim is not None:
            self.null_context = nn.Parameter(torch.randn(context_dim) / math.sqrt(context_dim))  # context_dim
            self.context_embed = nn.Sequential(nn.Linear(context_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.input_proj = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(PriorBlock(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), zero_module(nn.Linear(width, dim)))
        self.register_buffer("data_mean", torch.zeros(dim))
        self.register_buffer("data_std", torch.ones(dim))

    @property
    def conditional(self):
        return self.context_dim is not None

    def normalize(self, x):  # B x dim, the cache's units -> the model's
        return (x - self.data_mean) / self.data_std

    def denormalize(self, z):
        return z * self.data_std + self.data_mean

    def pooled_context(self, context, context_mask, batch):
        """B x context_dim: each caption's mean real token (unet.mean_token), or the learned null vector for a row
        with no real token (context None, or a mask row all False: the unconditional branch of guidance)."""
        null = self.null_context.expand(batch, -1)
        if context is None:
            return null
        has_tokens = context_mask.any(1) if context_mask is not None else torch.ones(batch, dtype=torch.bool)
        return torch.where(has_tokens.to(null.device)[:, None], mean_token(context, context_mask).to(null), null)

    @staticmethod
    def drop_context(context_mask, drop):
        """The mask with every token of the rows where `drop` (B bool) is True masked out: they get the null vector
        (classifier-free guidance's dropped captions)."""
        return context_mask & ~drop[:, None]

    def forward(self, x, t, context=None, context_mask=None):
        """The prediction B x dim for normalised noisy embeddings x (B x dim) at timesteps t (B). context: B x L x
        context_dim caption tokens with context_mask B x L (True = real token), as the UNet takes them; None, or a
        row without real tokens, is unconditional. An unconditional prior takes no context."""
        emb = self.time_embed(timestep_embedding(t, self.width).to(x.dtype))  # B x width
        if self.conditional:
            emb = emb + self.context_embed(self.pooled_context(context, context_mask, x.shape[0]))
        elif context is not None:
            raise UserError("this embedding prior is unconditional: it takes no caption")
        h = self.input_proj(x)  # B x width
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)  # B x dim

def save_prior(path, prior, extra=None):
    """OUT.safetensors (`prior`'s weights, its data statistics included) + OUT.json (its config and `extra`)."""
    config = {**(extra or {}), "model": MODEL_NAME, "prior": prior.config, "conditional": prior.conditional}
    return save_model(path, prior.state_dict(), config)


def read_prior(path):
    """(tensors, config) of a file written by save_prior; anything else is a UserError."""
    tensors, config = load_model(path, "embedding prior")
    if config.get("model") != MODEL_NAME:
        raise UserError(f"{path} is not a Noise2Art embedding prior (model: {config.get('model')!r})")
    return tensors, config


def load_prior(path, device="cpu"):
    """The EmbeddingPrior saved at `path` (its EMA weights), in eval mode and frozen, on `device`."""
    tensors, config = read_prior(path)
    try:
        prior = EmbeddingPrior(**config["prior"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"embedding prior {path} has a malformed config: {err}") from None
    load_weights(prior, tensors, f"embedding prior weights of {path}")
    return prior.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Sampling: the learned prior through samplers.py's samplers, and the non-parametric one


@torch.no_grad()
def pooled_captions(encoder, captions, batch_size=256):
    """U x dim: the mean real token of each caption under `encoder` (text_encoder.TextEncoder's interface)."""
    chunks = [mean_token(*encoder.encode(captions[i:i + batch_size])) for i in range(0, len(captions), batch_size)]
    return torch.cat(chunks).float().cpu()


def caption_context(prior, captions, num, text_encoder=None):
    """(context num x 1 x context_dim, mask num x 1) for `captions` (one string for every row, or num strings), each
    distinct caption encoded once; (None, None) without captions. Loads the prior's text encoder unless given one."""
    if captions is None:
        return None, None
    if not prior.conditional:
        raise UserError("this embedding prior is unconditional: it takes no caption (train one with --conditional)")
    captions = [captions] * num if isinstance(captions, str) else list(captions)
    if len(captions) != num:
        raise UserError(f"{len(captions)} captions for {num} embeddings: give one, or one per embedding")
    if text_encoder is None:
        from text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder

        text_encoder = TextEncoder(prior.config["text_encoder"] or DEFAULT_TEXT_ENCODER, prior.data_mean.device)
    if text_encoder.dim != prior.context_dim:
        raise UserError(f"text encoder {text_encoder.name} gives {text_encoder.dim}-dim tokens, the prior was trained "
                        f"on {prior.context_dim}")
    distinct = list(dict.fromkeys(captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    pooled = pooled_captions(text_encoder, distinct)[[index[c] for c in captions]]  # num x context_dim
    device = prior.data_mean.device
    return pooled[:, None].to(device), torch.ones(num, 1, dtype=torch.bool, device=device)


@torch.no_grad()
def sample_embeddings(prior, num, seed=0, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, captions=None,
                      guidance_scale=DEFAULT_GUIDANCE_SCALE, text_encoder=None, progress=False):
    """num x D embeddings in the cache's units; row i draws all its noise from torch.Generator(seed + i). captions:
    None (unconditional: the null vector), one string for every row or one per row (a conditional prior);
    guidance_scale: classifier-free guidance, uncond + scale (cond - uncond), 1 = the conditional prediction alone."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (choose {', '.join(SAMPLERS)})")
    if guidance_scale < 0:
        raise UserError(f"the guidance scale must be at least 0, got {guidance_scale}")
    device = prior.data_mean.device
    context, mask = caption_context(prior, captions, num, text_encoder)
    uncond_mask = None if mask is None else torch.zeros_like(mask)  # every token masked out: the null vector
    model_fn = guided_model_fn(prior, context, mask, context, uncond_mask, guidance_scale)
    denoiser = make_denoiser(model_fn, prior.schedule, prior.config["prediction_type"])
    karras = DEFAULT_KARRAS[sampler] and prior.schedule.alphas_cumprod[-1] > 0
    timesteps = sampling_timesteps(prior.schedule, steps, karras)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num)]
    noise = randn((num, prior.dim), generators, device)  # num x D
    return prior.denormalize(SAMPLERS[sampler](denoiser, noise, prior.schedule, timesteps, generators, progress))


def nearest_prior_sample(train_embeddings, num, seed=0, noise_std=0.1):
    """The non-parametric prior: num x D, row i a training embedding (train_embeddings: M x D) drawn by
    torch.Generator(seed + i), plus noise_std N(0, I) noise from the same generator (in the cache's units)."""
    rows = []
    for i in range(num):
        generator = torch.Generator().manual_seed(seed + i)
        row = train_embeddings[torch.randint(len(train_embeddings), (1,), generator=generator)]  # 1 x D
        rows.append(row + noise_std * torch.randn(row.shape, generator=generator))
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------
# Training


def prior_loss(prior, x0, t, noise, context=None, context_mask=None, drop=None):
    """The diffusion loss (NoiseSchedule.training_loss) on normalised embeddings x0 (B x D) at timesteps t (B) with
    noise (B x D); rows where `drop` is True lose their caption (classifier-free guidance)."""
    if drop is not None:
        context_mask = prior.drop_context(context_mask, drop)
    return prior.schedule.training_loss(lambda x, t_: prior(x, t_, context, context_mask), x0,
                                        prior.config["prediction_type"], t=t, noise=noise)


class PriorTraining:
    """Everything a training step changes: the prior, its EMA copy, AdamW and the generator that draws each step's
    timesteps, noise and caption drops (the batch rows come from training_loop.epoch_order)."""

    def __init__(self, prior, lr, weight_decay, seed):
        self.prior, self.step = prior, 0
        self.ema = copy.deepcopy(prior).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.recent_losses = collections.deque(maxlen=100)

    def mean_loss(self):
        """The mean loss of the last 100 steps (None before the first)."""
        return float(np.mean(self.recent_losses)) if self.recent_losses else None

    def state(self):
        return {"step": self.step, "model": self.prior.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state(self, state, path):
        load_weights(self.prior, state["model"], f"prior weights of {path}")
        load_weights(self.ema, state["ema"], f"EMA weights of {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]


class TrainingData:
    """The training vectors (M x D, on the training device) and, for a conditional prior, the pooled embedding of
    each distinct caption (U x 1 x context_dim) and each vector's caption (M ids)."""

    def __init__(self, vectors, device, contexts=None, caption_ids=None):
        self.vectors, self.contexts, self.caption_ids = vectors.to(device), contexts, caption_ids
        if contexts is not None:
            self.contexts, self.caption_ids = contexts.to(device), caption_ids.to(device)

    def batch(self, rows):
        """(vectors B x D, context B x 1 x context_dim or None, mask B x 1 or None) of rows (B)."""
        rows = rows.to(self.vectors.device)
        if self.contexts is None:
            return self.vectors[rows], None, None
        context = self.contexts[self.caption_ids[rows]]
        return self.vectors[rows], context, torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)


def training_data(vectors, captions, text_encoder, device):
    """TrainingData of vectors (M x D) and their captions (M strings, or None: unconditional), each distinct caption
    encoded once."""
    if captions is None:
        return TrainingData(vectors, device)
    distinct = list(dict.fromkeys(captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    contexts = pooled_captions(text_encoder, distinct)[:, None]  # U x 1 x context_dim
    return TrainingData(vectors, device, contexts, torch.tensor([index[c] for c in captions]))


def train_step(run, data, rows, lr, cond_drop, max_ema_decay):
    """One AdamW step at learning rate `lr` on `rows` of `data`, then the EMA update. Returns the loss."""
    prior = run.prior
    vectors, context, mask = data.batch(rows)
    x0 = prior.normalize(vectors)
    t = torch.randint(0, prior.schedule.num_train_timesteps, (len(x0),), generator=run.generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=run.generator).to(x0.device)
    drop = None if context is None else (torch.rand(len(x0), generator=run.generator) < cond_drop).to(x0.device)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss = prior_loss(prior, x0, t, noise, context, mask, drop)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    update_ema(run.ema, prior, ema_decay(run.step, max_ema_decay))
    run.step += 1
    run.recent_losses.append(loss.item())
    return loss.item()


def train(run, data, max_steps, batch_size, lr, warmup_steps, cond_drop=0.1, ema_decay=0.999, seed=0,
          on_checkpoint=None, checkpoint_every=0, log_every=0, stop=None, say=print):
    """Train `run` up to `max_steps` on batches in the data order (batch_rows), the learning rate warmed up linearly
    then decayed on a cosine to 0 (lr_factor). on_checkpoint(run) runs every `checkpoint_every` steps, at the end, and
    when `stop.name` is set (StopSignal), which ends the run."""
    start, start_step = time.perf_counter(), run.step
    while run.step < max_steps:
        rows = batch_rows(len(data.vectors), batch_size, seed, run.step * batch_size)
        train_step(run, data, rows, lr * lr_factor(run.step, warmup_steps, max_steps, "cosine"), cond_drop, ema_decay)
        stopping = stop is not None and stop.name is not None
        if log_every and (run.step % log_every == 0 or run.step == max_steps):
            speed = (run.step - start_step) / (time.perf_counter() - start)
            say(f"step {run.step}/{max_steps}  loss {run.mean_loss():.4f}  {speed:.1f} steps/s")
        if on_checkpoint and (stopping or run.step == max_steps or (checkpoint_every and
                                                                      run.step % checkpoint_every == 0)):
            on_checkpoint(run)
        if stopping:
            break
    return run


# ----------------------------------------------------------------------------------------------
# Evaluation: Fréchet distance to held-out embeddings, and how close samples come to training ones


def frechet_to(samples, reference_statistics):
    return float(frechet_distance(*mean_and_covariance(samples.numpy()), *reference_statistics))


def nearest_distances(queries, train_vectors, chunk=1024):
    """Q: the Euclidean distance from each query (Q x D) to its nearest training vector (M x D)."""
    return torch.cat([torch.cdist(queries[i:i + chunk], train_vectors).min(1).values
                      for i in range(0, len(queries), chunk)])


def precision_recall(samples, reference, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019): the fraction of samples inside some reference
    vector's k-nearest-neighbour ball (samples that look real), and of reference vectors inside some sample's
    (the part of the data the samples cover). Unlike FD, which sees only means and covariances, they tell samples on
    the data from samples between its clusters."""
    def radii(x):  # N: each vector's distance to its k-th nearest other vector
        return torch.cat([torch.cdist(x[i:i + 1024], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), 1024)])

    def covered(queries, points, point_radii):
        return torch.cat([(torch.cdist(queries[i:i + 1024], points) <= point_radii).any(1)
                          for i in range(0, len(queries), 1024)]).float().mean().item()

    return covered(samples, reference, radii(reference)), covered(reference, samples, radii(samples))


def conditional_nearest_sample(train_vectors, train_captions, captions, seed, noise_std):
    """nearest_prior_sample with row i drawn among the training vectors of captions[i], by torch.Generator(seed + i)."""
    by_caption = {c: train_vectors[[j for j, tc in enumerate(train_captions) if tc == c]] for c in set(captions)}
    missing = [c for c, rows in by_caption.items() if len(rows) == 0]
    if missing:
        raise UserError(f"no training embedding has the caption {missing[0]!r}")
    return torch.cat([nearest_prior_sample(by_caption[c], 1, seed + i, noise_std) for i, c in enumerate(captions)])


def gaussian_sample(train_vectors, num, seed=0):
    """num x D from the Gaussian with the training vectors' mean and covariance: what FD alone cannot tell from the
    data, the baseline that shows whether a prior learnt more than two moments."""
    mean, covariance = train_vectors.mean(0), torch.cov(train_vectors.T.double())
    root = torch.linalg.cholesky(covariance + 1e-9 * torch.eye(len(mean), dtype=torch.float64))  # D x D
    noise = torch.randn(num, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + noise @ root.T).float()


def candidate_samples(prior, train_vectors, num_samples, seed, noise_stds, steps, sampler, guidance_scale,
                      train_captions=None, captions=None, text_encoder=None):
    """name -> num_samples x D embeddings of each prior --evaluate compares; `captions` (one per sample) adds the
    caption-conditioned versions."""
    chosen = torch.randperm(len(train_vectors), generator=torch.Generator().manual_seed(seed))[:num_samples]
    candidates = {"training paintings themselves (real data)": train_vectors[chosen],
                  "Gaussian with the training mean and covariance": gaussian_sample(train_vectors, num_samples, seed),
                  "learned prior": sample_embeddings(prior, num_samples, seed, steps, sampler).cpu()}
    for std in noise_stds:
        candidates[f"training embedding + noise {std:g}"] = nearest_prior_sample(train_vectors, num_samples, seed, std)
    if captions is not None:
        candidates[f"learned prior, reference captions, guidance {guidance_scale:g}"] = sample_embeddings(
            prior, num_samples, seed, steps, sampler, captions, guidance_scale, text_encoder).cpu()
        for std in noise_stds:
            candidates[f"same-caption training embedding + noise {std:g}"] = conditional_nearest_sample(
                train_vectors, train_captions, captions, seed, std)
    return candidates


def evaluate_priors(prior, train_vectors, reference, num_samples, seed=0, noise_stds=DEFAULT_NOISE_STDS,
                    steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                    train_captions=None, reference_captions=None, text_encoder=None):
    """{name: {fd, kid, precision, recall, copy_ratio}} against `reference` (R x D held-out embeddings) for the
    candidate_samples: training paintings (each measure's value for real data at this sample size), a
    Gaussian with their moments, the learned prior (unconditional; and, for a conditional prior with reference
    captions, guided by those captions, cycled) and the non-parametric prior at each noise std. copy_ratio: the
    median distance of a sample to its nearest training embedding over that of a reference embedding; well below 1
    means copies."""
    captions = None
    if prior.conditional and reference_captions is not None and train_captions is not None:
        captions = [reference_captions[i % len(reference_captions)] for i in range(num_samples)]
    candidates = candidate_samples(prior, train_vectors, num_samples, seed, noise_stds, steps, sampler,
                                   guidance_scale, train_captions, captions, text_encoder)
    statistics = mean_and_covariance(reference.numpy())
    reference_distance = nearest_distances(reference, train_vectors).median()
    results = {}
    for name, samples in candidates.items():
        precision, recall = precision_recall(samples, reference)
        results[name] = dict(fd=frechet_to(samples, statistics), kid=kid(samples.numpy(), reference.numpy(), 20)[0],
                             precision=precision, recall=recall,
                             copy_ratio=float(nearest_distances(samples, train_vectors).median() / reference_distance))
    return results


def evaluation_sets(path, config, embeddings, captions, reference_path=None):
    """(training vectors, their captions, reference vectors, their captions, description) for --evaluate: the
    training rows of the prior, and the held-out paintings of its training or a --reference cache's."""
    recorded = config.get("embeddings", {})
    train_ids, held_ids = split_paintings(len(embeddings), recorded.get("holdout", 0), recorded.get("holdout_seed", 0))
    train_vectors, train_captions = rows_of(embeddings, captions, train_ids)
    if reference_path is not None:
        reference, reference_captions = load_embedding_cache(reference_path)
        if reference.shape[1] != embeddings.shape[1]:
            raise UserError(f"--reference {reference_path} holds {reference.shape[1]}-dim embeddings, --embeddings "
                            f"{embeddings.shape[1]}-dim")
        return train_vectors, train_captions, reference, reference_captions, f"the paintings of {reference_path}"
    if not len(held_ids):
        raise UserError(f"{path} was trained on every painting of its cache: pass --reference CACHE (embeddings of "
                        "other paintings, e.g. the test split's), or train with --holdout N")
    held_captions = None if captions is None else [captions[i] for i in held_ids.tolist()]
    return train_vectors, train_captions, embeddings[held_ids], held_captions, "the paintings held out of training"


# ----------------------------------------------------------------------------------------------
# Command line


def float_list(text):
    """argparse type: comma-separated non-negative numbers."""
    return [non_negative_float(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    parser = ArgumentParser(__file__, description="Train a diffusion prior over image embeddings (--out), or compare "
                            "one with the non-parametric prior (--evaluate).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="train: write OUT.safetensors + OUT.json (and OUT-checkpoints/ for --resume)")
    mode.add_argument("--evaluate", metavar="PRIOR", help="compare this prior checkpoint with the non-parametric "
                      "prior on held-out embeddings: FD, KID, precision/recall and nearest-training distances")
    parser.add_argument("--embeddings", required=True, help="embedding cache NAME (NAME.safetensors + NAME.json, as "
                        "image_embedding.py writes it): the training embeddings")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data order, noise and held-out "
                        "paintings (training) or of the samples (--evaluate)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads. The MLP is small: a second "
                        "thread pays only on an idle machine (on a busy 2-core one, steps took 10-25x longer with 2)")
    g = parser.add_argument_group("training")
    g.add_argument("--conditional", action="store_true", help="condition on the cache's captions (their mean text "
                   "token embedding), with a learned null vector for classifier-free guidance")
    g.add_argument("--text_encoder", default=None, help="text encoder for --conditional (default: all-MiniLM-L6-v2, "
                   "the UNet's)")
    g.add_argument("--width", type=positive_int, default=256, help="width of the residual MLP")
    g.add_argument("--depth", type=positive_int, default=4, help="residual blocks")
    g.add_argument("--schedule", default=DEFAULT_SCHEDULE["kind"], choices=["cosine", "linear", "scaled_linear"],
                   help="noise schedule (1000 steps)")
    g.add_argument("--prediction_type", default=DEFAULT_PREDICTION, choices=["v", "epsilon"],
                   help="what the MLP predicts (v: x0 stays bounded at the noisy end, where sampling starts)")
    g.add_argument("--max_steps", type=positive_int, default=4000, help="optimizer steps")
    g.add_argument("--batch_size", type=positive_int, default=256, help="embeddings per step")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (cosine decay to 0)")
    g.add_argument("--warmup_steps", type=non_negative_int, default=100, help="linear learning-rate warm-up steps")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--ema_decay", type=non_negative_float, default=0.999, help="EMA decay (warmed up as trainer.py's); "
                   "the exported weights are the EMA's")
    g.add_argument("--cond_drop", type=non_negative_float, default=0.1, help="--conditional: probability of training "
                   "a row without its caption (classifier-free guidance)")
    g.add_argument("--holdout", type=non_negative_int, default=0, help="paintings left out of "
                   "training, for --evaluate without --reference")
    g.add_argument("--log_every", type=non_negative_int, default=500, help="steps between loss lines (0 = never)")
    g.add_argument("--checkpoint_every", type=non_negative_int, default=1000, help="steps between training states "
                   "and exports (0 = only at the end)")
    g.add_argument("--resume", default=None, help="'auto': continue from the newest training state in "
                   "OUT-checkpoints/, or a state folder")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--reference", help="embedding cache of other paintings (e.g. the test split's) to measure against "
                   "(default: the paintings --holdout left out)")
    e.add_argument("--num_samples", type=at_least(2), default=2000, help="embeddings drawn from each prior")
    e.add_argument("--noise_std", type=float_list, default=list(DEFAULT_NOISE_STDS),
                   help="comma-separated noise standard deviations of the non-parametric prior")
    e.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS), help="sampler")
    e.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="sampling steps")
    e.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance scale of a conditional prior")
    args = parser.parse_args(argv)
    if not 0 <= args.cond_drop < 1 or not 0 <= args.ema_decay < 1:
        raise UserError(f"--cond_drop and --ema_decay must be in [0, 1), got {args.cond_drop} and {args.ema_decay}")
    return args


def run_identity(args, digest, dim):
    """What --resume must find unchanged."""
    return {"embeddings": digest, "dim": dim, "conditional": args.conditional, "text_encoder": args.text_encoder,
            "width": args.width, "depth": args.depth, "schedule": args.schedule,
            "prediction_type": args.prediction_type, "batch_size": args.batch_size,
            "seed": args.seed, "holdout": args.holdout, "max_steps": args.max_steps}


def checkpoint_folder(out):
    base = model_paths(out)[0].with_suffix("")
    return base.with_name(base.name + "-checkpoints")


def train_main(args):
    check_output_file(model_paths(args.out)[0], "--out")
    embeddings, captions = load_embedding_cache(args.embeddings)
    if args.conditional and captions is None:
        raise UserError(f"--conditional needs captions: the embedding cache {args.embeddings} has none (its JSON "
                        "'captions' is null)")
    device = pick_device(args.device)
    digest = file_digest(model_paths(args.embeddings)[0])
    identity = run_identity(args, digest, embeddings.shape[1])
    folder = checkpoint_folder(args.out)
    resume_path, state = load_resume(args.resume, folder, "choose another --out")
    if state is not None:
        check_run_identity(state.get("identity"), identity, resume_path, "choose another --out")
    train_ids, _ = split_paintings(len(embeddings), args.holdout, args.seed)
    vectors, row_captions = rows_of(embeddings, captions if args.conditional else None, train_ids)
    encoder = load_text_encoder(args.text_encoder) if args.conditional else None
    prior = new_prior(vectors, args.width, args.depth, encoder, args.schedule, args.prediction_type)
    run = PriorTraining(prior.to(device), args.lr, args.weight_decay, args.seed)
    if state is not None:
        run.load_state(state, resume_path)
        print(f"resuming {resume_path} at step {run.step}")
    data = training_data(vectors, row_captions, encoder, device)
    print(f"training {'a conditional' if args.conditional else 'an unconditional'} prior on {len(vectors)} embeddings "
          f"(D = {prior.dim}), "
          f"{sum(p.numel() for p in prior.parameters()):,} parameters")
    extra = {"embeddings": {"path": str(args.embeddings), "sha256": digest, "paintings": len(embeddings),
                            "holdout": args.holdout, "holdout_seed": args.seed}, "weights": "ema"}
    started = time.perf_counter()

    def save(run):
        save_state_dir(checkpoint_path(folder, run.step), {**run.state(), "identity": identity})
        prune_checkpoints(folder, 1)
        training = {**training_flags(args), "steps": run.step, "loss": run.mean_loss(),
                    "seconds": round(time.perf_counter() - started, 1)}
        save_prior(args.out, run.ema, {**extra, "training": training})

    with StopSignal() as stop:
        train(run, data, args.max_steps, args.batch_size, args.lr, args.warmup_steps, args.cond_drop, args.ema_decay,
              args.seed, save, args.checkpoint_every, args.log_every, stop)
    if stop.name is not None:
        print(f"stopped by {stop.name} at step {run.step}: saved; continue with --resume auto")
        return 0
    print(f"wrote {model_paths(args.out)[0]} (step {run.step}, loss {run.mean_loss():.4f}: the mean of the last "
          f"{len(run.recent_losses)} steps)")
    return 0


def new_prior(vectors, width, depth, text_encoder, schedule_kind, prediction_type):
    """A fresh EmbeddingPrior for training vectors (M x D), whose mean and std it keeps; conditioned on `text_encoder`'s
    tokens unless it is None."""
    prior = EmbeddingPrior(vectors.shape[1], width, depth, text_encoder.dim if text_encoder else None,
                           text_encoder.name if text_encoder else None, {**DEFAULT_SCHEDULE, "kind": schedule_kind},
                           prediction_type)
    prior.data_mean.copy_(vectors.mean(0))
    prior.data_std.copy_(vectors.std(0).clamp(min=1e-6))
    return prior


def load_text_encoder(name):
    from text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder

    return TextEncoder(name or DEFAULT_TEXT_ENCODER)


def training_flags(args):
    keys = ("conditional", "width", "depth", "schedule", "prediction_type", "max_steps", "batch_size", "lr",
            "warmup_steps", "weight_decay", "ema_decay", "cond_drop", "holdout", "seed")
    return {k: getattr(args, k) for k in keys}


def evaluate_main(args):
    prior = load_prior(args.evaluate, pick_device(args.device))
    _, config = read_prior(args.evaluate)
    embeddings, captions = load_embedding_cache(args.embeddings)
    if embeddings.shape[1] != prior.dim:
        raise UserError(f"the prior {args.evaluate} generates {prior.dim}-dim embeddings, --embeddings "
                        f"{args.embeddings} holds {embeddings.shape[1]}-dim ones")
    recorded = config.get("embeddings", {})
    if recorded.get("holdout") and args.reference is None and recorded.get("sha256") != file_digest(
            model_paths(args.embeddings)[0]):
        raise UserError(f"--embeddings {args.embeddings} is not the cache {args.evaluate} was trained on, whose "
                        "held-out paintings it would measure against: pass that cache or a --reference")
    train_vectors, train_captions, reference, reference_captions, what = evaluation_sets(
        args.evaluate, config, embeddings, captions, args.reference)
    results = evaluate_priors(prior, train_vectors, reference, args.num_samples, args.seed, args.noise_std,
                              args.steps, args.sampler, args.guidance_scale, train_captions, reference_captions)
    print(f"{args.num_samples} samples each against {what} ({len(reference)}); training set "
          f"{len(train_vectors)} embeddings; sampler {args.sampler}, {args.steps} steps")
    print(f"{'prior':<62} {'FD':>8} {'KID':>8} {'precision':>9} {'recall':>6}  copy ratio")
    for name, r in results.items():
        print(f"{name:<62} {r['fd']:8.3f} {r['kid']:8.4f} {r['precision']:9.3f} {r['recall']:6.3f}  "
              f"{r['copy_ratio']:.2f}")
    print("FD sees only means and covariances (the Gaussian matches them); precision: samples inside the held-out "
          "data's 3-nearest-neighbour balls, recall: data inside the samples'; copy ratio: median distance to the "
          "nearest training embedding, over the held-out embeddings' (well below 1: copies)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return train_main(args) if args.out is not None else evaluate_main(args)


if __name__ == "__main__":
    run_cli(main)
