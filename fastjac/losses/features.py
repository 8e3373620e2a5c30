"""Intermediate features by layer name, through forward hooks (seed 000 §5.2, §6.3.1).

Layer names are those of ``model.named_modules()`` (e.g. ``"layer1"`` of a torchvision ResNet for the
output of its first residual stage, ``"features.13"`` of a Sequential VGG). The captured tensors are the
modules' outputs themselves, not copies: they carry the graph (create_graph-safe, differentiable to the
parameters) when the forward ran with gradients, and nothing when it ran under ``torch.no_grad()``.

Converted models (:func:`fastjac.convert` with ``fuse=True``): a BatchNorm fused with the following ReLU
outputs the post-ReLU values and the ReLU's slot becomes an ``nn.Identity``; hook the ReLU's name (or a
block / pooling layer) to get the same features as the plain model.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Iterator, Sequence, Union

from torch import Tensor, nn

__all__ = ["LayerNotFoundError", "capture_features", "get_layer", "StopForward"]


class LayerNotFoundError(KeyError):
    """A layer name that ``model.named_modules()`` does not contain (the message lists valid names)."""

    def __str__(self) -> str:
        return str(self.args[0])


class StopForward(Exception):
    """Raised by a capture hook (``stop_after``) to end a forward pass once the features are taken."""


def get_layer(model: nn.Module, name: str, *, caller: str = "get_layer") -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``); a clear error if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"fastjac.losses.{caller}: layer names must be strings, got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=3)
    top = [n for n in valid if "." not in n]
    hint = f" Did you mean {close}?" if close else ""
    raise LayerNotFoundError(
        f"fastjac.losses.{caller}: layer {name!r} not found in {type(model).__name__}.{hint} Valid names "
        f"({len(valid)} in total) include {top[:8] + [n for n in valid if '.' in n][:4]}"
    )


@contextlib.contextmanager
def capture_features(model: nn.Module, layers: Union[str, Sequence[str]], *, stop_after: bool = False,
                     ) -> Iterator[dict[str, Tensor]]:
    """Within the block, ``features[name]`` is the output of layer ``name`` in the latest forward pass.

    ``stop_after=True`` (one layer only) ends each forward pass right after that layer by raising
    :class:`StopForward`, which the caller catches; later layers are not run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastjac.losses.capture_features: model must be a torch.nn.Module, got {type(model).__name__}")
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("fastjac.losses.capture_features: layers must name at least one layer")
    if stop_after and len(names) != 1:
        raise ValueError("fastjac.losses.capture_features: stop_after=True needs exactly one layer")
    modules = {name: get_layer(model, name, caller="capture_features") for name in names}
    features: dict[str, Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"fastjac.losses.capture_features: layer {name!r} returned {type(output).__name__}, not a tensor")
            features[name] = output
            if stop_after:
                raise StopForward(name)
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield features
    finally:
        for h in handles:
            h.remove()
