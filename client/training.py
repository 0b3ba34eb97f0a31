"""Local training and evaluation on one site's preprocessed cases (no Flower here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import DataError
from shared.metrics import dice_per_class, nanmean

if TYPE_CHECKING:
    import torch

    from shared.config import RunConfig


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced (besides the weights)."""

    num_examples: int
    train_loss: float
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics of one site; Dice per foreground class and averaged."""

    num_examples: int
    dice: float
    dice_per_class: list[float]
    loss: float


def make_loss() -> torch.nn.Module:
    """Dice + cross-entropy on softmax outputs, labels given as class indices."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


SGD_MOMENTUM = 0.9


def make_optimizer(model: torch.nn.Module, *, config: RunConfig) -> torch.optim.Optimizer:
    """The local optimizer named by run config ``optimizer``: Adam, or SGD with momentum 0.9.

    Adam rescales every weight's update to about the learning rate, so under DP
    weights whose gradient is mostly noise random-walk; SGD does not (on one
    synthetic site it trained to DP Dice 0.80 where Adam reached 0.23), but in
    the default federation Adam still did better (BENCHMARKS.md).
    """
    import torch

    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate)


def train_local(model: torch.nn.Module, loader: Any, *, config: RunConfig,
                device: torch.device, num_examples: int) -> TrainResult:
    """Train ``model`` in place for ``config.local_epochs`` epochs over ``loader`` (no DP)."""
    import torch

    if num_examples == 0:
        raise DataError("the site has no training cases")
    model.to(device).train()
    optimizer = make_optimizer(model, config=config)
    losses = run_epochs(model, loader, optimizer, epochs=config.local_epochs, device=device)
    return TrainResult(num_examples=num_examples, train_loss=sum(losses) / len(losses), steps=len(losses))


def run_epochs(model: torch.nn.Module, loader: Any, optimizer: Any, *, epochs: int,
               device: torch.device) -> list[float]:
    """The training loop both modes share; returns the loss of every step.

    An empty batch (possible under Poisson sampling) still takes its optimizer
    step, so a DP optimizer adds its noise as the accountant assumes.
    """
    import torch

    loss_fn = make_loss()
    losses: list[float] = []
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            if batch and len(batch["image"]) > 0:
                image, label = batch["image"].to(device), batch["label"].to(device)
                loss = loss_fn(model(image), label)
                loss.backward()
                losses.append(float(loss.detach()))
            else:  # no example drawn: a DP optimizer still adds noise to a zero sum
                for param in model.parameters():
                    param.grad_sample = torch.zeros(0, *param.shape, device=param.device)
            optimizer.step()
    if not losses:
        raise DataError("local training ran no step (no batches)")
    return losses


def sliding_window_predictor(model: torch.nn.Module, *, patch_size: int, spatial_dims: int,
                             sw_batch_size: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``f(image) -> logits`` running MONAI sliding-window inference over patches."""
    from monai.inferers import sliding_window_inference

    roi = (patch_size,) * spatial_dims

    def predict(image: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(image, roi_size=roi, sw_batch_size=sw_batch_size,
                                        predictor=model, overlap=0.25, mode="gaussian")

    return predict


def evaluate_local(model: torch.nn.Module, cases: list[dict[str, Any]], *, config: RunConfig,
                   device: torch.device) -> EvalResult:
    """Evaluate ``model`` on whole preprocessed ``cases`` (one at a time)."""
    import torch

    if not cases:
        raise DataError("the site has no validation cases")
    model.to(device).eval()
    predict = sliding_window_predictor(model, patch_size=config.patch_size, spatial_dims=config.spatial_dims)
    loss_fn = make_loss()
    per_class: list[list[float]] = [[] for _ in range(config.num_classes - 1)]
    losses = []
    with torch.no_grad():
        for case in cases:
            image = case["image"].unsqueeze(0).to(device)
            label = case["label"].unsqueeze(0).to(device)
            logits = predict(image)
            losses.append(float(loss_fn(logits, label)))
            scores = dice_per_class(logits, label, num_classes=config.num_classes)[0]
            for index, score in enumerate(scores.tolist()):
                per_class[index].append(score)
    class_means = [nanmean(scores) for scores in per_class]
    return EvalResult(num_examples=len(cases), dice=nanmean(class_means),
                      dice_per_class=class_means, loss=sum(losses) / len(losses))
