"""Ghost norms (client/training/dp_ghost.py): per-sample norms and the clipped sum of large convolutions at few pixels."""

from __future__ import annotations

import pytest
import torch

from client.training.dp_ghost import (
    GhostGrad,
    ghost_weight_grad,
    padded_input_gram,
    takes_ghost_norms,
    unfolded,
)
from tests.per_sample import assert_exact_dp_step


def single_example_weight_grads(layer: torch.nn.Module, inputs: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    grads = []
    for i in range(len(inputs)):
        layer.zero_grad()
        layer(inputs[i:i + 1]).backward(backprops[i:i + 1])
        grads.append(layer.weight.grad.clone())
    return torch.stack(grads)


@pytest.mark.parametrize(("layer", "shape"), [
    (torch.nn.Conv2d(6, 8, 3, padding=1, stride=2), (3, 6, 5, 5)),
    (torch.nn.Conv2d(6, 8, 1), (3, 6, 2, 2)),
    (torch.nn.Conv3d(4, 6, 3, padding=(2, 1, 1), dilation=(2, 1, 1)), (3, 4, 3, 2, 2)),
    (torch.nn.Conv2d(6, 8, 3, padding=1), (3, 6, 4, 4)),  # few pixels: the padded input's Gram matrix
    (torch.nn.Conv3d(2, 3, 3, padding=1), (3, 2, 4, 4, 4)),
], ids=["strided-2D", "pointwise-2D", "dilated-3D", "padded-gram-2D", "padded-gram-3D"])
def test_ghost_norms_and_clipped_sum_equal_single_example_backward(layer, shape):
    inputs = torch.randn(shape) * torch.tensor([0.5, 1.0, 3.0]).view(3, *[1] * (len(shape) - 1))
    if len(shape) == 4:  # a channels-last view, as SwinUNETR's hidden states reach its convolutions
        inputs = inputs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    backprops = torch.randn_like(layer(inputs))
    want = single_example_weight_grads(layer, inputs, backprops)
    record = ghost_weight_grad(layer, inputs, backprops)
    torch.testing.assert_close(record.squared_norms, want.flatten(1).square().sum(1), rtol=1e-4, atol=1e-7)
    factors = torch.tensor([1.0, 0.25, 0.0])
    torch.testing.assert_close(record.clipped_sum(factors), torch.einsum("i,i...", factors, want),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("layer", "shape"), [
    (torch.nn.Conv2d(3, 4, 3, padding=2, stride=2, dilation=2), (2, 3, 7, 6)),
    (torch.nn.Conv3d(2, 3, (3, 1, 2), padding=(1, 0, 1), stride=(1, 2, 1)), (2, 2, 4, 5, 3)),
], ids=["strided-dilated-2D", "anisotropic-3D"])
def test_padded_input_gram_equals_the_unfolded_inputs_gram(layer, shape):
    inputs = torch.randn(shape)
    columns = unfolded(layer, inputs)
    out = tuple(layer(inputs).shape[2:])
    torch.testing.assert_close(padded_input_gram(layer, inputs, out), torch.bmm(columns.transpose(1, 2), columns),
                               rtol=1e-4, atol=1e-5)


def test_only_attached_large_convolutions_at_few_pixels_take_ghost_norms():
    from client.training import dp_ghost

    wide, small = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1)
    at_4x4, at_64x64 = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 64, 64)
    assert not takes_ghost_norms(wide, at_4x4, at_4x4), "a model nobody attached keeps its per-sample gradients"
    handle = dp_ghost.attach(torch.nn.Sequential(wide, small))
    assert takes_ghost_norms(wide, at_4x4, at_4x4)
    assert not takes_ghost_norms(wide, at_64x64, at_64x64), "many positions: materialising is cheaper"
    assert not takes_ghost_norms(small, torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)), "few weights"
    handle.remove()
    assert not takes_ghost_norms(wide, at_4x4, at_4x4)


class _Bottleneck(torch.nn.Module):
    """A wide convolution at 2x2 pixels between small ones: the ghost path inside a real DP-SGD step."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(1, 32, 4, stride=4)
        self.wide = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(32, 1, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.tanh(self.wide(torch.tanh(self.down(x)))))


def test_dp_step_with_a_ghost_layer_clips_as_single_example_backward():
    torch.manual_seed(0)
    model = _Bottleneck()
    images = torch.randn(3, 1, 8, 8) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    seen = []
    original = GhostGrad.clipped_sum
    GhostGrad.clipped_sum = lambda self, factors: seen.append(self.layer) or original(self, factors)
    try:
        assert_exact_dp_step(model, torch.nn.MSELoss(), images, torch.randn(3, 1, 8, 8), mode="hooks", clip=1e-3)
    finally:
        GhostGrad.clipped_sum = original
    assert model.wide in seen and model.up not in seen  # transposed convolutions keep their per-sample gradients


def test_fedseg_optimizer_adds_opacus_noise_and_keeps_its_step_hooks():
    from opacus.optimizers import DPOptimizer

    from client.training.dp_optimizer import FedsegDPOptimizer, upgrade

    weights = torch.nn.Parameter(torch.zeros(100_000))
    optimizer = DPOptimizer(torch.optim.SGD([weights], lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0,
                            expected_batch_size=4, generator=torch.Generator().manual_seed(0))
    hooked = []
    optimizer.attach_step_hook(hooked.append)  # as make_private attaches the accountant
    assert upgrade(optimizer) is optimizer and type(optimizer) is FedsegDPOptimizer
    clipped = torch.randn(4, 100_000) * 1e-3  # four examples, every one below the clipping norm (2.0)
    weights.grad_sample = clipped.clone()
    optimizer.step()
    noise = -weights.detach() * 4 - clipped.sum(0)  # lr 1 from 0: the update is -(clipped sum + noise) / 4
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.5 * 2.0) < 0.05
    assert hooked == [optimizer]
    with pytest.raises(TypeError, match="flat-clipping"):
        upgrade(torch.optim.SGD([weights], lr=1.0))
