"""One change to Opacus 1.6's per-sample gradient bookkeeping: keep a full-batch per-sample gradient as it is.

``opacus.grad_sample.grad_sample_module.create_or_accumulate_grad_sample``
stores the first per-sample gradient of a parameter in each step by filling a
zero buffer of the batch's length and copying the gradient into it, also when
the gradient already has that length (always, in fedseg's hooks mode: a
Poisson batch's examples all reach every layer). For a network with millions of
weights that is two extra passes over ``batch x weights`` floats per step
(2D FlexibleUNet, 7.4 M weights, batches of 8: 80 ms of zero fill and 50 ms of
copy in a 0.9 s DP step; BENCHMARKS.md). :func:`apply` makes Opacus keep the
sampler's tensor itself in that case: the same values, in the same place
(``param._current_grad_sample``). Every grad sampler Opacus or fedseg
registers returns a tensor of its own (never a view of an activation or of a
buffer that is written again; with ``loss_reduction="mean"``, as fedseg runs
Opacus, even the output gradient a sampler gets is a fresh product), which is
what keeping it needs. Anything else (a shorter batch, a layer called twice in
one forward pass) goes to Opacus' own code. :func:`restore` puts Opacus' back
(``benchmarks.dp_step``'s stock variant).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import grad_sample_module

_OPACUS_CREATE_OR_ACCUMULATE = grad_sample_module.create_or_accumulate_grad_sample


def create_or_accumulate_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Opacus' function, keeping ``grad_sample`` itself when it is a parameter's first of the step and full-length."""
    if (param.requires_grad and not hasattr(param, "_current_grad_sample")
            and grad_sample.shape[0] == max_batch_len and grad_sample.shape[1:] == param.shape):
        param._current_grad_sample = grad_sample
        return
    _OPACUS_CREATE_OR_ACCUMULATE(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


def apply() -> None:
    """Route Opacus' hooks (``GradSampleHooks.capture_backprops_hook``) through :func:`create_or_accumulate_grad_sample`."""
    grad_sample_module.create_or_accumulate_grad_sample = create_or_accumulate_grad_sample


def restore() -> None:
    """Opacus' own bookkeeping again (zero fill and copy)."""
    grad_sample_module.create_or_accumulate_grad_sample = _OPACUS_CREATE_OR_ACCUMULATE
