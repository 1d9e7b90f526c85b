"""Shared by the examples: host timing of one optimizer step."""
import time

import torch


def timed_step(opt, device: str, step=None) -> float:
    """Seconds one ``opt.step()`` (or ``step()``, e.g. a step with a closure) takes, host-timed. On CUDA the queue
    is drained before and after (kernels run asynchronously); bench/run.py measures with CUDA events instead."""
    step = step or opt.step
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
