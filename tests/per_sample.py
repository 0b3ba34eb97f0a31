"""Per-sample gradients two ways: torch one example at a time, and one DP-SGD step as fedseg runs it."""

from __future__ import annotations

import torch

from client.training.dp_ghost import GhostGrad
from client.training.dp_grad_samplers import folded_weight_grad
from client.training.dp_sgd import DPPlan, make_private
from client.training.local import run_steps


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
            mode: str, clip: float):
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


def materialised(grad_sample: torch.Tensor | GhostGrad) -> torch.Tensor:
    """Per-sample gradients, also of a layer that kept only its ghost norms (client/training/dp_ghost.py)."""
    if isinstance(grad_sample, GhostGrad):
        return folded_weight_grad(grad_sample.layer, grad_sample.inputs, grad_sample.backprops)
    return grad_sample


def assert_on_fast_samplers(model: torch.nn.Module) -> None:
    """Every layer with weights has a registered grad sampler (no functorch fallback) and no convolution is bound
    to Opacus' unfold sampler (string padding or a padding mode other than zeros; client/training/dp_grad_samplers.py)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    from client.training import dp_grad_samplers, dp_norm_samplers, dp_windows  # noqa: F401 - registers them, as make_private

    layer_types = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    fallback = layer_types - set(GradSampleHooks.GRAD_SAMPLERS)
    assert not fallback, f"would fall back to functorch: {fallback}"
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert all(isinstance(m.padding, tuple) and m.padding_mode == "zeros" for m in convolutions), \
        "a convolution would be bound to Opacus' unfold sampler"


def assert_exact_dp_step(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor,
                         labels: torch.Tensor, *, mode: str, clip: float) -> None:
    """One DP-SGD step's per-sample gradients equal single-example backward, and its update the clipped mean."""
    grads = single_example_grads(model, loss_fn, images, labels)
    expected, norms = clipped_mean(grads, clip=clip)
    hooks = dp_step(model, loss_fn, images, labels, mode=mode, clip=clip)
    for index, (name, param) in enumerate(model.named_parameters()):
        want = torch.stack([example[index] for example in grads])
        torch.testing.assert_close(materialised(param.grad_sample), want, rtol=1e-4, atol=1e-6, msg=name)
        if isinstance(param.grad_sample, GhostGrad):  # its norms (what clipping reads) from the Gram matrices
            torch.testing.assert_close(param.grad_sample.squared_norms, want.flatten(1).square().sum(1),
                                       rtol=1e-4, atol=1e-9, msg=name)
    assert min(norms) > clip, "the test needs every example above the clipping norm"
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)
    hooks.cleanup()
