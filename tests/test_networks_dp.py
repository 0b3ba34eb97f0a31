"""Every network under DP-SGD: exact per-sample gradients of every layer, fedseg's samplers, in-place ops."""

from __future__ import annotations

import pytest
import torch

from client.training.dp_inplace import OutOfPlaceOnHookedOutputs, out_of_place
from client.training.local import make_loss
from shared.model import build_model
from tests.networks import CASES, batch, tiny_config
from tests.per_sample import assert_exact_dp_step, assert_on_fast_samplers


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_per_sample_gradients_of_every_parameter_equal_single_example_backward(name, dims, monkeypatch):
    from client.training import opacus_patches

    torch.manual_seed(0)
    config = tiny_config(name, dims)
    model = build_model(config)
    assert_on_fast_samplers(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    images, labels = batch(config, n=3)
    copied, opacus_copy = [], opacus_patches._OPACUS_CREATE_OR_ACCUMULATE
    monkeypatch.setattr(opacus_patches, "_OPACUS_CREATE_OR_ACCUMULATE",
                        lambda **kwargs: copied.append(kwargs) or opacus_copy(**kwargs))
    assert_exact_dp_step(model, make_loss(model_config=config), images, labels, mode="hooks", clip=1e-3)
    assert not copied, "every per-sample gradient is kept as its sampler returned it (client/training/opacus_patches.py)"
    assert not model._forward_hooks and not model._forward_pre_hooks, "fedseg's hooks leave with Opacus'"


def test_swin_window_attention_uses_fedseg_samplers_and_no_buffer():
    pytest.importorskip("einops")
    from monai.networks.nets.swin_unetr import WindowAttention

    model = build_model(tiny_config("swinunetr", 2))
    attentions = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert attentions and not any(list(m.buffers()) for m in attentions)  # Opacus refuses layers with buffers
    assert not any("relative_position_index" in key for key in model.state_dict())


def test_prelu_sampler_with_one_and_per_channel_slopes():
    from client.training.dp_grad_samplers import prelu_grad_sample

    for slopes in (1, 4):
        layer = torch.nn.PReLU(slopes)
        layer.weight.data.uniform_(0.1, 0.3)
        inputs, backprops = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        want = []
        for i in range(3):
            layer.zero_grad()
            layer(inputs[i:i + 1]).backward(backprops[i:i + 1])
            want.append(layer.weight.grad.clone())
        got = prelu_grad_sample(layer, [inputs], backprops)[layer.weight]
        torch.testing.assert_close(got, torch.stack(want))


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.GroupNorm(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        out += x  # as MONAI's residual blocks: in place on a hooked layer's output
        return torch.nn.functional.relu(out, inplace=True)


def test_in_place_ops_on_hooked_outputs_run_out_of_place_with_the_same_values():
    assert out_of_place(torch.Tensor.add_) is torch.Tensor.add and out_of_place(torch.relu_) is torch.relu
    assert out_of_place(torch.Tensor.add) is None
    model, x = _Residual(), torch.randn(2, 2, 6, 6)
    plain = model(x)
    model.conv.register_full_backward_hook(lambda *_: None)
    model.norm.register_full_backward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="modified inplace"):
        model(x)
    with OutOfPlaceOnHookedOutputs():
        hooked = model(x)
    torch.testing.assert_close(hooked, plain)


@pytest.mark.parametrize(("layer", "shape"), [
    (torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 3, 12, 12)),
    (torch.nn.Conv2d(3, 4, 3, padding=1), (3, 12, 12, -3)),  # a channels-last view, as SwinUNETR's hidden states
    (torch.nn.Conv3d(2, 4, (3, 3, 1), padding=(1, 1, 0), dilation=(2, 1, 1), groups=2), (2, 2, 8, 6, 4)),
    (torch.nn.ConvTranspose3d(4, 2, 2, stride=2), (2, 4, 3, 3, 3)),
], ids=["strided-2D", "channels-last-2D", "grouped-dilated-3D", "transposed-3D"])
def test_every_convolution_method_equals_single_example_backward(layer, shape):
    from client.training.dp_grad_samplers import (
        channels_last_weight_grad,
        folded_weight_grad,
        per_example_weight_grad,
        unfolded_weight_grad,
    )

    inputs = torch.randn(shape) if shape[-1] > 0 else torch.randn(*shape[:-1], -shape[-1]).permute(0, 3, 1, 2)
    shape = inputs.shape
    backprops = torch.randn_like(layer(inputs))
    want = []
    for i in range(shape[0]):
        layer.zero_grad()
        layer(inputs[i:i + 1]).backward(backprops[i:i + 1])
        want.append(layer.weight.grad.clone())
    methods = [folded_weight_grad, per_example_weight_grad, channels_last_weight_grad]
    methods += [] if layer.transposed else [unfolded_weight_grad]
    for method in methods:
        torch.testing.assert_close(method(layer, inputs, backprops), torch.stack(want), msg=method.__name__)


@pytest.mark.parametrize("layer", [torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm3d(4, affine=True)],
                         ids=["group", "instance-3D"])
def test_norm_sampler_equals_single_example_backward(layer):
    from client.training.dp_norm_samplers import norm_grad_sample

    layer.weight.data.uniform_(0.5, 1.5)
    shape = (3, 4, 6, 5) if isinstance(layer, torch.nn.GroupNorm) else (3, 4, 4, 5, 3)
    inputs, backprops = torch.randn(shape) * 3 + 1, torch.randn(shape)
    want = {p: [] for p in (layer.weight, layer.bias)}
    for i in range(3):
        layer.zero_grad()
        layer(inputs[i:i + 1]).backward(backprops[i:i + 1])
        for param, grads in want.items():
            grads.append(param.grad.clone())
    got = norm_grad_sample(layer, [inputs], backprops)
    for param, grads in want.items():
        torch.testing.assert_close(got[param], torch.stack(grads), rtol=1e-4, atol=1e-5)


def test_opacus_keeps_a_full_batch_per_sample_gradient_and_pads_a_short_one():
    from client.training.opacus_patches import create_or_accumulate_grad_sample

    param = torch.nn.Parameter(torch.zeros(2, 3))
    full, short = torch.randn(4, 2, 3), torch.randn(3, 2, 3)
    accumulated = full.clone()
    accumulated[:3] += short
    create_or_accumulate_grad_sample(param=param, grad_sample=full, max_batch_len=4)
    assert param._current_grad_sample is full  # kept, no zero fill and copy
    create_or_accumulate_grad_sample(param=param, grad_sample=short, max_batch_len=4)  # a second call accumulates
    torch.testing.assert_close(param._current_grad_sample, accumulated)
    del param._current_grad_sample
    create_or_accumulate_grad_sample(param=param, grad_sample=short, max_batch_len=4)
    torch.testing.assert_close(param._current_grad_sample, torch.cat([short, torch.zeros(1, 2, 3)]))
    del param._current_grad_sample
    autograds = torch.randn(4, 2, 3)  # a buffer someone else holds (Opacus' Linear bias sampler returns one)
    create_or_accumulate_grad_sample(param=param, grad_sample=autograds.detach(), max_batch_len=4)
    assert param._current_grad_sample.data_ptr() != autograds.data_ptr()
    torch.testing.assert_close(param._current_grad_sample, autograds)
    del param._current_grad_sample
    private_view = torch.randn(4 * 6).view(4, 2, 3)  # a view of the sampler's own result, as the samplers return
    create_or_accumulate_grad_sample(param=param, grad_sample=private_view, max_batch_len=4)
    assert param._current_grad_sample is private_view


class _Twice(torch.nn.Module):
    """One convolution called twice in a forward pass: Opacus accumulates its per-sample gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.GroupNorm(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.norm(self.conv(x))))


def test_a_layer_called_twice_has_exact_per_sample_gradients():
    torch.manual_seed(0)
    images = torch.randn(3, 2, 6, 6) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    assert_exact_dp_step(_Twice(), torch.nn.MSELoss(), images, torch.randn(3, 2, 6, 6), mode="hooks", clip=1e-3)
