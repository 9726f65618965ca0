"""DPM-Solver++(2M) step spacing against an exact denoiser: Gaussian data N(0, STD^2) through the bundled models'
schedule (scaled-linear 0.0015-0.0195). Prints, per step count and spacing, the output std over the data std and
the RMS distance to the exact probability-flow solution (in data stds). The tables of docs/sampler-steps.md.

    python experiments/sampler_oracle.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gaussian_oracle import exact_flow, sample_gaussian  # noqa: E402
from schedule import NoiseSchedule  # noqa: E402

VARIANTS = {"even": (False, False), "karras": (True, False), "even + lower_order_final": (False, True),
            "karras + lower_order_final": (True, True)}


def main():
    schedule = NoiseSchedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
    for std in (1.0, 0.3):
        print(f"\ndata std {std}: output std / data std, RMS error against the exact flow")
        print("steps | " + " | ".join(VARIANTS))
        for steps in (10, 15, 20, 30):
            cells = []
            for karras, lower_order_final in VARIANTS.values():
                samples, latents = sample_gaussian("dpmpp-2m", steps, karras=karras, schedule=schedule, mu=0.0,
                                                   std=std, lower_order_final=lower_order_final)
                error = (samples - exact_flow(schedule, latents, 0.0, std)).pow(2).mean().sqrt() / std
                cells.append(f"{samples.std().item() / std:.3f} / {error.item():.3f}")
            print(f"{steps} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
