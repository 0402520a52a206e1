"""Adversarial perturbations (cap, pmt, syc, leg, region), shared by `aloe adv-train` and `aloe eval --perturb`."""
