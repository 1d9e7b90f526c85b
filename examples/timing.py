"""Shared by the examples: host timing of one optimizer step."""
import time

import torch


def timed_step(opt, device: str) -> float:
    """Seconds one ``opt.step()`` takes, host-timed. On CUDA the queue is drained before and after (kernels run
    asynchronously); bench/run.py measures with CUDA events instead."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
