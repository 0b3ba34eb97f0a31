"""Per-sample gradients two ways: torch one example at a time, and one DP-SGD step as fedseg runs it."""

from __future__ import annotations

import torch

from client.dp_training import DPPlan, make_private
from client.training import run_steps


def single_example_grads(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor,
                         labels: torch.Tensor) -> list[list[torch.Tensor]]:
    """``[example][parameter]`` gradients of ``loss_fn``, one plain backward pass per example (no Opacus)."""
    grads = []
    for index in range(len(images)):
        model.zero_grad()
        loss_fn(model(images[index:index + 1]), labels[index:index + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return grads


def clipped_mean(grads: list[list[torch.Tensor]], *, clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """DP-SGD's noiseless update by hand: (mean of the clipped per-example gradients, per-example norms)."""
    total = [torch.zeros_like(g) for g in grads[0]]
    norms = []
    for example in grads:
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in example)))
        norms.append(norm)
        for acc, grad in zip(total, example, strict=True):
            acc += grad * min(1.0, clip / (norm + 1e-6)) / len(grads)
    return total, norms


def dp_step(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
            mode: str, clip: float):  # noqa: ANN201 - Opacus' hooks object
    """One DP-SGD step through fedseg's ``make_private`` and training loop, at lr 0 without noise.

    Leaves each parameter's ``grad_sample`` (per example) and ``grad`` (clipped
    mean); returns Opacus' hooks for the caller to ``cleanup()``.
    """
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=len(images))
    plan = DPPlan(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0, steps=1, grad_sample_mode=mode)
    hooks, dp_optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, plan=plan)
    run_steps(model, [{"image": images, "label": labels}], dp_optimizer, steps=1, device=torch.device("cpu"),
              per_sample_grads=True, loss_fn=loss_fn)
    return hooks
