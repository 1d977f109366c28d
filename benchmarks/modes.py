"""Forward, backward and forward+backward callables from one forward function.

``forward(*inputs)`` returns a tensor or a tuple of tensors; ``grad_of(inputs)`` names
what the backward differentiates (the inputs that need a gradient and the parameters).
The forward runs with autograd recording, as in training, so "fwd" includes the cost of
saving what the backward needs. "bwd" replays the backward of graphs built once per
input set (retain_graph), so only the backward is timed. Output gradients are random
(never zeros or ones: a kernel must not get a cheap special case).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .timing import rotate


def _tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _random_like(outs):
    return tuple(torch.randn_like(o) for o in outs)


def mode_runner(forward: Callable, input_sets: Sequence[tuple], grad_of: Callable[[tuple], list], mode: str):
    """A zero-argument callable running ``mode`` on the input sets in turn."""
    if mode == "fwd":
        nxt = rotate(input_sets)
        return lambda: forward(*nxt())
    if mode == "fwd+bwd":
        first = _tuple(forward(*input_sets[0]))
        grads = [_random_like(first) for _ in input_sets]
        del first
        nxt = rotate(list(zip(input_sets, grads)))

        def fwd_bwd():
            inputs, gouts = nxt()
            outs = _tuple(forward(*inputs))
            return torch.autograd.grad(outs, grad_of(inputs), gouts, allow_unused=True)

        return fwd_bwd
    if mode == "bwd":
        graphs = []
        for inputs in input_sets:
            outs = _tuple(forward(*inputs))
            graphs.append((outs, grad_of(inputs), _random_like(outs)))
        nxt = rotate(graphs)

        def bwd():
            outs, targets, gouts = nxt()
            return torch.autograd.grad(outs, targets, gouts, retain_graph=True, allow_unused=True)

        return bwd
    raise ValueError(f"unknown mode {mode!r}")
