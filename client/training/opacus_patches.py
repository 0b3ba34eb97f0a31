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
(``param._current_grad_sample``).

Only a tensor no one else holds is kept (:func:`exclusively_owned`): Opacus'
Linear and LayerNorm samplers return the layer's output gradient itself as the
bias gradient of a batch of vectors, and that buffer belongs to autograd, which
may still add into it. Such a tensor, a shorter batch, or a layer called twice
in one forward pass go to Opacus' own code. :func:`restore` puts Opacus' back
(``benchmarks.dp_step``'s stock variant).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import grad_sample_module

from client.training.dp_ghost import GhostGrad

_OPACUS_CREATE_OR_ACCUMULATE = grad_sample_module.create_or_accumulate_grad_sample


def exclusively_owned(tensor: torch.Tensor) -> bool:
    """``tensor``'s memory is held by nothing but ``tensor`` (and, for a view, the tensor it views).

    Counts the holders of its storage: the tensor, the storage object this
    call makes, and a view's base; any other (an alias, a second view) means
    someone else may read or write the memory. False where torch cannot count
    them (a private function of torch 2.x).
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(tensor.untyped_storage()._cdata) == 2 + (tensor._base is not None)


def create_or_accumulate_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor | GhostGrad,
                                     max_batch_len: int) -> None:
    """Opacus' function, keeping ``grad_sample`` itself when it is a parameter's first of the step, full-length and
    exclusively owned, or a :class:`client.training.dp_ghost.GhostGrad` (only made for a layer's first and only call)."""
    if isinstance(grad_sample, GhostGrad):
        param._current_grad_sample = grad_sample
        return
    if (param.requires_grad and not hasattr(param, "_current_grad_sample")
            and grad_sample.shape[0] == max_batch_len and grad_sample.shape[1:] == param.shape
            and exclusively_owned(grad_sample)):
        param._current_grad_sample = grad_sample
        return
    _OPACUS_CREATE_OR_ACCUMULATE(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


def apply() -> None:
    """Route Opacus' hooks (``GradSampleHooks.capture_backprops_hook``) through :func:`create_or_accumulate_grad_sample`."""
    grad_sample_module.create_or_accumulate_grad_sample = create_or_accumulate_grad_sample


def restore() -> None:
    """Opacus' own bookkeeping again (zero fill and copy)."""
    grad_sample_module.create_or_accumulate_grad_sample = _OPACUS_CREATE_OR_ACCUMULATE
