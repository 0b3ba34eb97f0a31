"""Local training and evaluation on one site's preprocessed cases (no Flower here)."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.errors import DataError
from shared.metrics import dice_per_class, hd95_per_class, nanmean

if TYPE_CHECKING:
    import torch

    from shared.config import RunConfig
    from shared.model import ModelConfig
    from shared.plan import Plan


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
    hd95: float = float("nan")
    hd95_per_class: list[float] = field(default_factory=list)
    per_case: list[dict[str, Any]] = field(default_factory=list)


def make_loss(*, model_config: ModelConfig | None = None) -> torch.nn.Module:
    """Dice (foreground classes only) + cross-entropy on softmax outputs, labels as class indices.

    The Dice term leaves the background class out (``include_background=False``,
    as nnU-Net's Dice does): background Dice is near 1 on every patch and mostly
    rewards predicting "no lesion". On the default federation this shortened the
    "predict nothing" plateau from three rounds to two and raised federated Dice
    (BENCHMARKS.md, issue 7). The loss is still a mean of per-case terms
    (``batch=False``), as DP-SGD's per-sample clipping needs.

    With deep supervision in ``model_config`` (DynUNet), MONAI's
    ``DeepSupervisionLoss`` wraps it (:class:`client.training.losses.StackedDeepSupervisionLoss`):
    every output is scored against the target and weighted ``1, 1/2, 1/4, ...``
    normalised to sum 1, as nnU-Net does, so the total stays on the scale of
    one DiceCE (the same learning rate and clipping norm fit) and, a weighted
    sum of batch means of per-case terms, is still a mean of per-case terms.
    """
    from monai.losses import DiceCELoss

    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    if model_config is None or model_config.deep_supervision == 0:
        return loss
    from client.training.losses import StackedDeepSupervisionLoss, nnunet_weights

    return StackedDeepSupervisionLoss(loss, weights=nnunet_weights(model_config.deep_supervision + 1))


SGD_MOMENTUM = 0.9


def freeze_weights(model: torch.nn.Module, frozen: Collection[str]) -> None:
    """Turn gradients off for the ``frozen`` parameters (run config ``train-layers``), on for the others.

    A frozen weight then takes no optimiser step (:func:`make_optimizer` leaves
    it out) and, under DP, no per-sample gradient and no noise (Opacus noises
    only parameters that require a gradient).
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)


def make_optimizer(model: torch.nn.Module, *, config: RunConfig) -> torch.optim.Optimizer:
    """The local optimizer named by run config ``optimizer``: Adam, or SGD with momentum 0.9.

    Adam rescales every weight's update to about the learning rate, so under DP
    weights whose gradient is mostly noise random-walk; SGD does not (on one
    synthetic site it trained to DP Dice 0.80 where Adam reached 0.23), but in
    the default federation Adam still did better (BENCHMARKS.md).
    """
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]  # run config train-layers freezes the others
    if config.optimizer == "sgd":
        return torch.optim.SGD(trained, lr=config.learning_rate, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(trained, lr=config.learning_rate)


def train_local(model: torch.nn.Module, loader: Any, *, config: RunConfig, device: torch.device,
                num_examples: int, proximal_mu: float = 0.0, loss_fn: torch.nn.Module | None = None) -> TrainResult:
    """Train ``model`` in place for one pass over ``loader`` (no DP): its batches are the round's steps.

    With ``proximal_mu`` > 0 (FedProx), the loss gains ``(mu / 2) * ||w - w_global||^2``,
    where ``w_global`` are the weights ``model`` holds when this is called.
    ``train_loss`` reports the task loss alone. ``loss_fn`` defaults to :func:`make_loss`
    (pass ``make_loss(model_config=...)`` for a network with deep supervision).
    """
    if num_examples == 0:
        raise DataError("the site has no training cases")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    model.to(device).train()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimizer = make_optimizer(model, config=config)
    losses = run_steps(model, loader, optimizer, steps=len(loader), device=device,
                       proximal=(global_params, proximal_mu), loss_fn=loss_fn)
    return TrainResult(num_examples=num_examples, train_loss=mean_loss(losses), steps=len(loader))


def mean_loss(losses: list[float]) -> float:
    """Mean of the step losses; NaN if no step saw an example (the server skips NaN in its means)."""
    return sum(losses) / len(losses) if losses else math.nan


def run_steps(model: torch.nn.Module, loader: Any, optimizer: Any, *, steps: int,
              device: torch.device, proximal: tuple[list[torch.Tensor], float] = ([], 0.0),
              per_sample_grads: bool = False, loss_fn: torch.nn.Module | None = None) -> list[float]:
    """The training loop both modes share: ``steps`` optimizer steps over ``loader`` (re-iterated as
    needed); returns the (task) loss of every step that saw examples.

    An empty batch (possible under Poisson sampling) still takes its optimizer
    step, so a DP optimizer adds its noise as the accountant assumes; it has no
    loss, so a round whose every Poisson batch was empty returns ``[]``. Raises
    :class:`DataError` if the loader yields no batch at all.
    ``proximal`` = (global weights, mu) adds FedProx's term to the loss.
    ``per_sample_grads``: the optimizer is Opacus' (see :func:`train_step`).
    ``loss_fn`` defaults to :func:`make_loss` (no deep supervision).
    """
    import torch

    loss_fn = make_loss() if loss_fn is None else loss_fn
    losses: list[float] = []
    taken = 0
    while taken < steps:
        before = taken
        for batch in loader:
            taken += 1
            optimizer.zero_grad(set_to_none=True)
            if batch and len(batch["image"]) > 0:
                losses.append(train_step(model, batch["image"].to(device), batch["label"].to(device), loss_fn,
                                         proximal=proximal, per_sample_grads=per_sample_grads))
            else:  # no example drawn: a DP optimizer still adds noise to a zero sum
                for param in model.parameters():
                    param.grad_sample = torch.zeros(0, *param.shape, device=param.device)
            optimizer.step()
            if taken == steps:
                break
        if taken == before:
            raise DataError("local training ran no step (no batches)")
    return losses


def train_step(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: torch.nn.Module, *,
               proximal: tuple[list[torch.Tensor], float] = ([], 0.0), per_sample_grads: bool = False) -> float:
    """Forward and backward pass of one batch (the optimizer steps afterwards); returns the task loss.

    With ``per_sample_grads`` (DP-SGD: Opacus computes per-sample gradients in
    the layers' backward hooks, and its optimizer replaces ``p.grad`` by their
    clipped, noised mean), the backward pass asks autograd only for the
    gradient of the first trained layers' outputs
    (:mod:`client.training.dp_backward`): every trained layer's backward hook
    still fires with its output gradient, but autograd skips the batch weight
    gradients, which the DP optimizer would discard. That pass starts from the
    loss times the batch length, the sum of the per-case losses, so that each
    layer's output gradient holds every example's own gradient, as the hooks of
    :func:`client.training.dp_sgd.make_private` need.
    """
    from client.training.dp_backward import backward_to, first_trained_outputs

    if per_sample_grads and proximal[0]:
        raise ValueError("FedProx's proximal term has no per-sample gradients: not supported with per_sample_grads")
    if per_sample_grads:
        with first_trained_outputs(model) as firsts:
            loss = loss_fn(model(image), label)
        task_loss = float(loss.detach())
        backward_to(loss * len(image), firsts)
        return task_loss
    loss = loss_fn(model(image), label)
    task_loss = float(loss.detach())
    if proximal[0]:
        loss = loss + proximal_term(model, proximal[0], mu=proximal[1])
    loss.backward()
    return task_loss


def proximal_term(model: torch.nn.Module, global_params: list[torch.Tensor], *, mu: float) -> torch.Tensor:
    """FedProx's ``(mu / 2) * ||w - w_global||^2`` over all parameters."""
    squared = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
    return (mu / 2.0) * squared


def evaluate_local(model: torch.nn.Module, cases: list[dict[str, Any]], *, plan: Plan,
                   device: torch.device) -> EvalResult:
    """Evaluate ``model`` on whole preprocessed volumes ``cases`` (one at a time)."""
    import torch

    from client.inference.whole_volume import predict_volume

    if not cases:
        raise DataError("the site has no validation cases")
    model.to(device).eval()
    loss_fn = make_loss()
    per_case = []
    with torch.no_grad():
        for case in cases:
            label = case["label"].unsqueeze(0).to(device)
            logits = predict_volume(model, case["image"].to(device), spatial_dims=plan.spatial_dims,
                                    patch_size=plan.patch_size)
            spacing = tuple(case["spacing"].tolist()) if "spacing" in case else 1.0
            per_case.append({
                "loss": float(loss_fn(logits, label)),
                "dice": dice_per_class(logits, label, num_classes=plan.num_classes)[0].tolist(),
                "hd95": hd95_per_class(logits, label, num_classes=plan.num_classes, spacing=spacing)[0].tolist(),
            })
    dice_means = [nanmean([c["dice"][k] for c in per_case]) for k in range(plan.num_classes - 1)]
    hd95_means = [nanmean([c["hd95"][k] for c in per_case]) for k in range(plan.num_classes - 1)]
    return EvalResult(num_examples=len(cases), dice=nanmean(dice_means), dice_per_class=dice_means,
                      loss=sum(c["loss"] for c in per_case) / len(per_case), hd95=nanmean(hd95_means),
                      hd95_per_class=hd95_means, per_case=per_case)
