"""benchmarks.dp_signal: per-case gradient norms, the mean clipped gradient and DP-SGD's signal-to-noise."""

import math

import pytest
import torch

from benchmarks.dp_signal import gradient_signal, signal_to_noise


def test_the_mean_clipped_gradient_is_that_of_each_case_clipped_then_averaged():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # loss 0.5 (w.x - y)^2 at w = 0: each case's gradient is -y x, here (-3, 0) and (0, -1)
    batches = [(torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0]])), (torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0]]))]
    loss = lambda output, label: 0.5 * ((output - label) ** 2).sum()
    result = gradient_signal(model, batches, loss, parts={"all": ["weight"]}, clip=2.0)["all"]
    assert result["weights"] == 2
    assert result["median-norm"] == pytest.approx(2.0)  # norms 3 and 1
    assert result["mean-clipped-norm"] == pytest.approx(math.sqrt(1.25))  # mean of (-2, 0) and (0, -1)


def test_signal_to_noise_grows_with_the_square_root_of_the_steps_and_falls_with_the_weights():
    signal = {"weights": 4, "mean-clipped-norm": 0.5}
    # noise per step on the averaged gradient: 1 * 1 / 2 * sqrt(4) = 1; after 100 steps 100 * 0.5 / (10 * 1)
    assert signal_to_noise(signal, noise_multiplier=1.0, batch_size=2, clip=1.0, steps=100) == pytest.approx(5.0)
    assert signal_to_noise(signal, noise_multiplier=1.0, batch_size=2, clip=1.0, steps=400) == pytest.approx(10.0)
    wider = {**signal, "weights": 16}
    assert signal_to_noise(wider, noise_multiplier=1.0, batch_size=2, clip=1.0, steps=100) == pytest.approx(2.5)
