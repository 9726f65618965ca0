"""Processes for trainer.py: one per GPU under torchrun (DistributedDataParallel); plain `python trainer.py` is one
process and every helper here is then a no-op or the identity."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import UserError
from devices import pick_device
from training_loop import rng_state


def say(message):
    """Print on the main process only, without breaking a tqdm bar."""
    if is_main():
        tqdm.write(message)


def setup_distributed(device_name):
    """(rank, world_size, device). Under torchrun (RANK is set) joins the process group: nccl on GPUs, gloo on
    CPUs; each process takes the GPU of its LOCAL_RANK."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"multi-process training runs on cuda or cpu, not {device.type}")
    # Rank 0 may encode the latent cache for a long time while the others wait at a barrier.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value):
    """The mean of a 0-dim tensor over all processes, as a float."""
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value.item()


def any_rank(flag, device):
    """True on every process if `flag` is True on any of them (so all stop at the same step)."""
    if not dist.is_initialized():
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather_rng_states():
    """rng_state() of every process, in rank order (all_gather_object pickles, but only between our processes)."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


