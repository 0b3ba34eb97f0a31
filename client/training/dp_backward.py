"""The backward pass of a DP-SGD step: every trained layer's output gradient, and nothing autograd would discard.

Opacus' hooks compute per-sample gradients from each layer's input and output
gradient, and fedseg's DP optimizer replaces ``p.grad`` by their clipped, noised
mean, so the batch weight gradients of an ordinary backward pass are wasted
work. Asking autograd for the gradient of the input image instead (the usual
way to skip them) costs the first layer's input gradient: oneDNN's
backward-data kernel for one input channel is slow (BENCHMARKS.md: 414 ms for
3D FlexibleUNet's 7x7x7 stride-2 stem at 64^3, batch 2, against 28 ms for its
weight gradient and 37 ms for its forward pass), and with frozen layers
(run config ``train-layers``) it walks back through every frozen one too.

:func:`first_trained_outputs` records, during the forward pass, the raw output
of every layer with trained weights whose inputs need no gradient (the layers
reading the image; after frozen layers, the first trained ones), and
:func:`backward_to` asks autograd for the gradient of those outputs: every
trained layer lies on a path from the loss to one of them, so every hook fires,
and autograd computes no weight gradient and no gradient of the image or of a
frozen layer. The first layers' hooks then fire from their output gradient, as
PyTorch documents for a module none of whose inputs requires a gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# PyTorch warns on every such hook (the first layers' own, which is what this module relies on).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients", category=UserWarning)


@contextmanager
def first_trained_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, while the forward pass runs inside the block, the output of every layer of ``model`` holding trained
    weights whose tensor inputs need no gradient (hooks on this model only: thread-safe across models)."""
    outputs: list[torch.Tensor] = []

    def record(_module: torch.nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and not any(
                isinstance(value, torch.Tensor) and value.requires_grad for value in inputs):
            outputs.append(output)

    handles = [module.register_forward_hook(record) for module in model.modules()
               if any(p.requires_grad for p in module.parameters(recurse=False))]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def backward_to(loss: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Backward from ``loss`` to ``outputs`` only (:func:`first_trained_outputs`); with none (no layer of the model
    takes an input free of gradients), an ordinary backward pass."""
    if outputs:
        torch.autograd.backward(loss, inputs=outputs)
    else:
        loss.backward()
