"""DP-SGD's backward pass stops at the first trained layers' outputs: exact, and nothing upstream of them runs."""

from __future__ import annotations

import pytest
import torch

from client.training.dp_backward import backward_to, first_trained_outputs
from client.training.local import make_loss
from shared.model import build_model
from shared.networks import NETWORKS
from tests.networks import batch, tiny_config
from tests.per_sample import dp_step, materialised


def _freeze_all_but_decoder(model: torch.nn.Module, name: str) -> list[str]:
    import re

    pattern = re.compile(NETWORKS[name].decoder)
    trained = []
    for param_name, param in model.named_parameters():
        param.requires_grad_(bool(pattern.fullmatch(param_name)))
        if param.requires_grad:
            trained.append(param_name)
    return trained


@pytest.mark.parametrize("name", ["flexibleunet", "segresnet"])
def test_a_frozen_encoder_is_not_walked_back_and_the_decoder_gradients_stay_exact(name):
    torch.manual_seed(0)
    config = tiny_config(name, 2)
    model = build_model(config)
    trained = _freeze_all_but_decoder(model, name)
    assert trained and len(trained) < len(list(model.parameters()))
    loss_fn = make_loss(model_config=config)
    images, labels = batch(config, n=3)
    params = dict(model.named_parameters())
    want = {}
    for index in range(len(images)):  # single-example backward of the trained weights, no Opacus
        model.zero_grad()
        loss_fn(model(images[index:index + 1]), labels[index:index + 1]).backward()
        for param_name in trained:
            want.setdefault(param_name, []).append(params[param_name].grad.detach().clone())
    model.zero_grad()
    frozen_calls = []
    first_conv = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert not first_conv.weight.requires_grad
    handle = first_conv.register_full_backward_hook(lambda *args: frozen_calls.append(1))

    hooks = dp_step(model, loss_fn, images, labels, mode="hooks", clip=1e-3)
    handle.remove()
    assert frozen_calls == []  # the frozen stem's backward never ran (with the image's gradient asked for, it did)
    for param_name in trained:
        torch.testing.assert_close(materialised(params[param_name].grad_sample), torch.stack(want[param_name]),
                                   rtol=1e-4, atol=1e-6, msg=param_name)
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for n, p in params.items() if n not in trained)
    hooks.cleanup()


def test_the_first_trained_layers_are_those_reading_no_gradient_and_backward_stops_at_them():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 3))
    image = torch.randn(2, 1, 8, 8)
    with first_trained_outputs(model) as firsts:
        out = model(image)
    assert len(firsts) == 1 and firsts[0].shape == (2, 2, 6, 6)  # the first convolution's output only
    assert not model[0]._forward_hooks  # the recording hooks are gone after the block
    backward_to(out.square().sum(), firsts)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient computed
    assert firsts[0].grad is not None and not image.requires_grad

    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    with first_trained_outputs(model) as firsts:
        out = model(image)
    assert firsts == []  # nothing trains: an ordinary backward pass (none to compute here)
    with pytest.raises(RuntimeError):
        backward_to(out.sum(), firsts)
