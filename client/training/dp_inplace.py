"""In-place operations on a hooked layer's output, done out of place while Opacus' hooks are attached.

Opacus' per-sample hooks are full backward hooks: torch hands every hooked
layer's output on as a view made inside a custom autograd function, and
autograd forbids modifying such a view in place. MONAI's residual blocks do
exactly that (SegResNet's ``x += identity`` after a convolution, the ResNet
blocks' ``out += residual`` after a norm, in-place ReLUs after a norm), so
under DP-SGD they fail with "Output 0 of BackwardHookFunctionBackward is a view
and is being modified inplace". :class:`OutOfPlaceOnHookedOutputs` (a torch
function mode, active only during the model's forward pass) runs such an
operation (or a function called with ``inplace=True``) out of place instead
and returns the result, which ``x += y`` and ``out = relu(out, inplace=True)``
assign: the values are the same, and only operations
that would have failed are changed. Without DP (no hooks) nothing changes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

#: Where in-place operations live, each beside its out-of-place form (``add_`` / ``add``).
_OWNERS = (torch.Tensor, torch, torch._C._nn)


@functools.cache
def out_of_place(func: Callable[..., Any]) -> Callable[..., Any] | None:
    """The out-of-place form of an in-place torch operation (``Tensor.add_`` -> ``Tensor.add``), else None."""
    name = getattr(func, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    for owner in _OWNERS:
        if getattr(owner, name, None) is func:
            return getattr(owner, name[:-1], None)
    return None


@functools.cache
def takes_inplace(func: Callable[..., Any]) -> bool:
    """True for a function with an ``inplace`` argument (``torch.nn.functional.relu``, ``leaky_relu``, ...)."""
    try:
        return "inplace" in inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def is_hooked_output(value: Any) -> bool:
    """True for a layer output that torch's full backward hooks handed on (a view autograd must not modify)."""
    return isinstance(value, torch.Tensor) and type(value.grad_fn).__name__ == "BackwardHookFunctionBackward"


class OutOfPlaceOnHookedOutputs(TorchFunctionMode):
    """Run in-place operations on hooked outputs out of place (see the module docstring)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if args and is_hooked_output(args[0]):
            replacement = out_of_place(func)
            if replacement is not None:
                return replacement(*args, **kwargs)
            if takes_inplace(func):  # F.relu(x, inplace=True): its in-place call inside is not seen here
                bound = inspect.signature(func).bind(*args, **kwargs)
                bound.arguments["inplace"] = False
                return func(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)


def attach(model: torch.nn.Module) -> list[RemovableHandle]:
    """Make ``model``'s forward pass run inside :class:`OutOfPlaceOnHookedOutputs`; return the hooks' handles."""
    mode = OutOfPlaceOnHookedOutputs()

    def enter(_module: torch.nn.Module, _args: Any) -> None:
        mode.__enter__()

    def leave(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        mode.__exit__(None, None, None)

    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
