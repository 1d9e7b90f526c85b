"""Shared by the examples: the command line of a short, seeded training run."""
import argparse

import torch


def run_args(doc: str, steps: int) -> argparse.Namespace:
    """Parses --steps (default `steps`), with the example's docstring as its help, and seeds torch's RNG so that a
    run repeats."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    args = ap.parse_args()
    torch.manual_seed(0)
    return args
