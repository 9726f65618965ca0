"""The parts of a VQGAN's training that do not build the model: its start from --init_ckpt (load_init), its data
(every batch a pure function of (seed, step)), the step of its two optimizers with the dead-code restarts after it,
the learning rate, the latent-scale measurement at export, and the log line. vqgan.py's loop drives them.
"""
import random

import torch

from checkpoints import load_weights
from cli import UserError
from devices import autocast
from images import ImageTensorDataset, collate_skip_none
from metrics import code_statistics
from training_loop import append_log, epoch_order
from vqgan_losses import adaptive_gan_weight, hinge_d_loss, r1_penalty


# ----------------------------------------------------------------------------------------------
# A start from --init_ckpt: a published model.ckpt or one of our VQGANs, with its discriminator where it fits


def load_init(model, disc, tensors, path):
    """Autoencoder tensors load strictly; `loss.discriminator.*` go to `disc` where the shapes fit
    (returns whether they did); other `loss.*` entries (LPIPS, ...) are not part of the autoencoder."""
    load_weights(model, {k: v for k, v in tensors.items() if not k.startswith("loss.")}, f"--init_ckpt {path}")
    disc_tensors = {k.removeprefix("loss.discriminator."): v for k, v in tensors.items()
                    if k.startswith("loss.discriminator.")}
    expected = disc.state_dict()
    if disc_tensors.keys() != expected.keys() or any(v.shape != expected[k].shape for k, v in disc_tensors.items()):
        return False
    disc.load_state_dict(disc_tensors)
    return True


# ----------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, step), so a resumed run sees exactly the same images


class SeededAugmentation(torch.utils.data.Dataset):
    """`dataset[index]` with Python's RNG seeded per sample: random crops and flips depend only on the
    (index, seed) key, whatever the number of workers and across resumes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        saved = random.getstate()
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved)


def batch_plan(num_images, batch_size, seed, start_step, end_step):
    """Yields, for steps start_step..end_step-1, a list of (image index, augmentation seed):
    a fresh permutation of the data every epoch (training_loop.epoch_order)."""
    for step in range(start_step, end_step):
        batch = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(position, num_images)
            batch.append((int(epoch_order(num_images, seed, epoch)[offset]), seed * 1_000_003 + position))
        yield batch


def fixed_images(source, resolution, count):
    """The first `count` readable images, centre-cropped: the same preview at every checkpoint."""
    dataset = ImageTensorDataset(source, resolution, random_crop=False, flip=False)
    images = []
    for index in range(len(dataset)):
        if len(images) == count:
            break
        image = dataset[index]
        if image is not None:
            images.append(image)
    if not images:
        raise UserError(f"no readable images in {source.path}")
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------
# The step: two optimizers stepped by hand, as taming-transformers' VQModel does under Lightning


def train_step(model, disc, perceptual, opt_ae, opt_disc, images, step, weights, device, bf16=False):
    """One autoencoder update and, once step >= weights.disc_start, one discriminator update (LossWeights). The
    generator's adversarial term waits `disc_warmup` more steps, so it starts against a discriminator that already
    tells real from reconstructed. Returns (metrics, code indices B x h x w, latents before quantisation)."""
    train_disc = weights.disc_start is not None and step >= weights.disc_start
    use_gan = train_disc and step >= weights.disc_start + weights.disc_warmup
    with autocast(device, bf16):
        reconstructions, codebook_loss, indices, latents = model(images)
        reconstructions = reconstructions.float()
        l1 = (images - reconstructions).abs().mean()
        p_loss = torch.zeros((), device=device)
        if perceptual is not None:
            p_loss = perceptual(images, reconstructions).float().mean()
        nll_loss = l1 + weights.perceptual * p_loss
        loss = nll_loss + weights.codebook * codebook_loss
        metrics = {"l1": l1.item(), "perceptual": p_loss.item(), "codebook": codebook_loss.item()}
        if use_gan:
            g_loss = -disc(reconstructions).float().mean()
            d_weight = weights.disc * adaptive_gan_weight(nll_loss, g_loss, model.last_layer())
            loss = loss + d_weight * g_loss
            metrics.update(g_loss=g_loss.item(), d_weight=d_weight.item())
    opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    opt_ae.step()
    metrics["loss"] = loss.item()
    if train_disc:
        with autocast(device, bf16):
            if weights.disc_r1:
                logits_real, r1 = r1_penalty(disc, images)
                metrics["r1"] = r1.item()
            else:
                logits_real, r1 = disc(images).float(), 0.0
            logits_fake = disc(reconstructions.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
        opt_disc.zero_grad(set_to_none=True)
        (d_loss + weights.disc_r1 / 2 * r1).backward()
        opt_disc.step()
        metrics.update(d_loss=d_loss.item(), logits_real=logits_real.mean().item(),
                       logits_fake=logits_fake.mean().item())
    return metrics, indices, latents


def restart_dead_codes(codebook, last_used, latents, step, patience):
    """Codes unused for `patience` steps are moved onto random encoder outputs of this batch
    (latents B x C x h x w), so the codebook does not collapse to a few entries. Returns how many."""
    dead = (step - last_used) >= patience
    num_dead = int(dead.sum())
    if num_dead:
        vectors = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # N x C
        picks = torch.randint(len(vectors), (num_dead,)).to(vectors.device)
        with torch.no_grad():
            codebook[dead] = vectors[picks]
        last_used[dead] = step
    return num_dead


def dead_code_patience(dead_code_steps, init_ckpt, finetune_decoder):
    """--dead_code_steps, or its default: 20 from scratch, 0 (never) when fine-tuning --init_ckpt; always 0 with
    --finetune_decoder (a frozen codebook keeps its codes)."""
    if finetune_decoder:
        return 0
    return dead_code_steps if dead_code_steps is not None else (0 if init_ckpt else 20)


def learning_rate(step, lr, drop_step=None, drop_factor=0.25):
    """The learning rate of optimizer step `step` (from 0): `lr`, times `drop_factor` from step `drop_step` on
    (None: never). The shipped first stage ran at 4e-4, then at 1e-4 from step 1,653."""
    return lr * drop_factor if drop_step is not None and step >= drop_step else lr


# ----------------------------------------------------------------------------------------------
# The latent scale of an export, and the log line


@torch.no_grad()
def measure_latent_scale(model, source, resolution, num_images, batch_size, device):
    """1 / std of the (unquantised) latents of up to `num_images` images spread over the data."""
    dataset = ImageTensorDataset(source, resolution, random_crop=False, flip=False)
    stride = max(1, len(dataset) // num_images)
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), stride)[:num_images])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_skip_none)
    was_training = model.training
    model.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for images in loader:
        if images is None:
            continue
        latents = model.encode(images.to(device)).double()
        total, total_sq = total + latents.sum().item(), total_sq + latents.pow(2).sum().item()
        count += latents.numel()
    model.train(was_training)
    if count == 0:
        raise UserError(f"no readable images in {source.path} to measure the latent scale")
    std = max(total_sq / count - (total / count) ** 2, 1e-12) ** 0.5
    return 1.0 / std


def write_log(log_path, step, window, codes, bar):
    """A log.jsonl line: the means of the LogWindow and the codebook's use since the last line (`codes`: each code's
    count, codes restarted, images skipped), which then start again."""
    usage, perplexity = code_statistics(codes["used"])
    entry = {"step": step, **window.means(), "code_usage": usage, "perplexity": perplexity,
             "codes_restarted": codes["restarted"], "skipped_images": codes["skipped"],
             "steps_per_s": window.steps_per_s()}
    append_log(log_path, entry)
    shown = ("loss", "l1", "perceptual", "d_loss", "code_usage", "perplexity")
    bar.set_postfix({k: f"{entry[k]:.3g}" for k in shown if k in entry})
    window.reset()
    codes.update(restarted=0, skipped=0)
    codes["used"].zero_()
