"""Exact 2-Wasserstein error of each linear sampler on Gaussian data, by step count (no Monte Carlo).

Data N(0.5, 0.2²) per dimension, the exact ε-denoiser (docs/formulas.md: X1), Ho's linear schedule at T = 1000,
"trailing" timesteps, x_T ~ N(0, I). Prints a Markdown table (the README's) and the exact law of
DDIM with 50 steps. Run: python benchmarks/exact_w2_table.py
"""

import numpy as np

from ldmkit.reference import analytic, exact, schedules

STEPS = (10, 20, 50, 100, 1000)
LABELS = {"ddpm": "DDPM, σ² = β̃ (A1)", "ddpm_beta": "DDPM, σ² = β (A1)", "ddim": "DDIM η = 0 (A2)",
          "ddim_eta0.5": "DDIM η = 0.5 (A2)", "ddim_eta1": "DDIM η = 1 (A2)",
          "heun": "Heun, PF-ODE (A5; 2N−1 model calls)", "dpmpp2m": "DPM-Solver++(2M)"}


def main() -> None:
    schedule = schedules.Schedule.named("linear", 1000)
    data = analytic.GaussianData(mean=[0.5], var=0.04)
    table = exact.w2_table(data, schedule, STEPS)
    print("| sampler | " + " | ".join(f"{n} steps" for n in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for name, row in table.items():
        print(f"| {LABELS[name]} | " + " | ".join(f"{row[n]:.2e}" for n in STEPS) + " |")
    mean, var = exact.sampler_law("ddim", data, schedule, 50)
    print(f"\nDDIM (η = 0), 50 steps: output law N({mean[0]:.5f}, {np.sqrt(var[0]):.5f}²) "
          f"against the data's N(0.5, 0.2²)")


if __name__ == "__main__":
    main()
