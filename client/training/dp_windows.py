"""Exact per-sample gradients of shifted-window attention (MONAI's SwinUNETR) in Opacus' hooks mode.

Swin's ``WindowAttention`` runs on windows, not on examples: its input is
``(examples * windows, tokens, C)``, so Opacus would take every window for an
example. Its ``qkv`` and ``proj`` layers would get one gradient per window, and
its ``relative_position_bias_table`` (a parameter of the attention itself, for
which Opacus has no sampler) would go to functorch, which re-runs the layer
per window. Neither gives per-example gradients, and the shapes break
clipping. Here:

- a forward pre-hook on each ``SwinTransformerBlock`` (whose input is
  ``(examples, ..., C)``) records the number of examples as ``max_batch_len``
  (Opacus' own count of examples, which it uses instead of the input's length
  when a layer has it) on the attention, ``qkv`` and ``proj``;
- :func:`windowed_linear_grad_sample` (fedseg's ``nn.Linear`` sampler) folds an
  example's windows into its tokens (``window_partition`` keeps each example's
  windows together) and runs Opacus' own Linear sampler, so a token's
  contribution is summed per example, exactly;
- the bias table's per-example gradient is the gradient reaching the softmax's
  input (the attention logits, to which the gathered table is added), summed
  over each example's windows and scattered into the table's rows: a forward
  hook on the attention's ``softmax`` hooks that input's gradient during the
  real backward pass (no recomputation), and
  :func:`window_attention_grad_sample` hands the result to Opacus.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformerBlock, WindowAttention
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Per-example bias-table gradients of one forward pass each, newest last (a WindowAttention attribute).
TABLE_GRADS = "fedseg_table_grads"


def attach(model: nn.Module) -> list[RemovableHandle]:
    """Hook every Swin block of ``model`` as the module docstring says; return the hooks' handles."""
    handles = []
    for block in model.modules():
        if isinstance(block, SwinTransformerBlock):
            handles.append(block.register_forward_pre_hook(_count_examples))
            handles.append(block.attn.softmax.register_forward_hook(functools.partial(_hook_logits, block.attn)))
    return handles


def _count_examples(block: SwinTransformerBlock, args: tuple[Any, ...]) -> None:
    examples = args[0].shape[0]
    for layer in (block.attn, block.attn.qkv, block.attn.proj):
        layer.max_batch_len = examples


def _hook_logits(attention: WindowAttention, _softmax: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
    logits = args[0]
    if attention.training and torch.is_grad_enabled() and logits.requires_grad:
        logits.register_hook(functools.partial(_store_table_grads, attention))


def _store_table_grads(attention: WindowAttention, logit_grads: torch.Tensor) -> None:
    """Sum the logits' gradient ``(examples * windows, heads, n, n)`` per example into the table's rows."""
    examples, n = attention.max_batch_len, logit_grads.shape[-1]
    per_example = logit_grads.reshape(examples, -1, attention.num_heads, n * n).sum(dim=1)
    index = attention.relative_position_index[:n, :n].reshape(-1)  # the rows WindowAttention.forward gathers
    table = attention.relative_position_bias_table
    grads = per_example.new_zeros(examples, *table.shape).index_add_(1, index, per_example.transpose(1, 2))
    attention.__dict__.setdefault(TABLE_GRADS, []).append(grads)


def window_attention_grad_sample(layer: WindowAttention, activations: list[torch.Tensor],
                                 backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of the relative position bias table (``qkv`` and ``proj`` have their own hooks).

    The stored gradient is already each example's own: fedseg's DP backward
    pass starts from the batch's summed loss (``client.training.dp_sgd.make_private``).
    """
    return {layer.relative_position_bias_table: layer.__dict__[TABLE_GRADS].pop()}


def windowed_linear_grad_sample(layer: nn.Linear, activations: list[torch.Tensor],
                                backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' Linear sampler, on each example's windows folded into its tokens when the input holds windows."""
    inputs = activations[0]
    examples = getattr(layer, "max_batch_len", inputs.shape[0])
    if inputs.shape[0] != examples:
        inputs = inputs.reshape(examples, -1, inputs.shape[-1])
        backprops = backprops.reshape(examples, -1, backprops.shape[-1])
    return compute_linear_grad_sample(layer, [inputs], backprops)


register_grad_sampler(WindowAttention)(window_attention_grad_sample)
register_grad_sampler(nn.Linear)(windowed_linear_grad_sample)
