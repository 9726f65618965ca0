"""trainer.py's command, run under torchrun by test_trainer.py, recording at every optimizer step the gradient each
process steps with and the gradient of that process's own micro-batches alone: train_step again on a plain copy of
the same weights (no DistributedDataParallel), from the same random state, its optimizer at learning rate 0. Both go to
$GRADIENT_RECORD/rank{R}_step{N}.pt as lists in parameter order.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_gradient_probe.py TRAINER_FLAGS...
"""
import copy
import dataclasses
import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trainer  # noqa: E402
import unet_training  # noqa: E402
from cli import run_cli  # noqa: E402
from unet import UNet  # noqa: E402

RECORD = Path(os.environ["GRADIENT_RECORD"])
train_step = unet_training.train_step


def gradients_at_step(run, step):
    """Call step(), reading the gradients of run.unet just before run.optimizer steps."""
    seen = {}
    hook = run.optimizer.register_step_pre_hook(
        lambda *_: seen.update(grads=[p.grad.detach().clone() for p in run.unet.parameters()]))
    try:
        result = step()
    finally:
        hook.remove()
    return result, seen["grads"]


def alone(run):
    """A RunState of a plain copy of run's weights (no DDP) whose optimizer (SGD at lr 0) and LR schedule change
    nothing."""
    unet = UNet(**run.unet.config).to(run.device).train()
    unet.load_state_dict(run.unet.state_dict())
    return dataclasses.replace(run, unet=unet, model=unet, ema=copy.deepcopy(run.ema),
                               optimizer=torch.optim.SGD(unet.parameters(), lr=0.0),
                               lr_scheduler=types.SimpleNamespace(step=lambda: None), projector=None)


def recording_train_step(run, micro_batches, *args):
    step, before = run.step + 1, torch.get_rng_state()
    local = alone(run)  # the weights before this step
    torch.set_rng_state(before)  # building the copy drew an initialisation: the training's random stream goes on
    result, stepped = gradients_at_step(run, lambda: train_step(run, micro_batches, *args))
    after = torch.get_rng_state()
    torch.set_rng_state(before)  # the same timesteps and noise again
    _, own = gradients_at_step(local, lambda: train_step(local, micro_batches, *args))
    torch.set_rng_state(after)
    torch.save({"stepped": stepped, "alone": own}, RECORD / f"rank{dist.get_rank()}_step{step}.pt")
    return result


if __name__ == "__main__":
    trainer.train_step = recording_train_step  # where trainer.py's loop looks it up
    sys.argv = ["trainer.py", *sys.argv[1:]]
    run_cli(trainer.main)
