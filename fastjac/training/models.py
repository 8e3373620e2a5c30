"""Models of the experiments (``../shared/EXPERIMENTS.md``, "Shared definitions").

- **VGG-k** (seed 000 supp. §4.1, thesis §2.12.1): blocks of 3×3 conv (stride 1, pad 1, no bias: the BatchNorm
  that follows has one) → BatchNorm → ReLU, ``M`` = 2×2 max-pool stride 2, then global average pool and one
  linear layer. VGG-6 and VGG-11 are not specified by the seeds; :data:`VGG_CONFIGS` states our choice.
- **CIFAR ResNet-18/34** (thesis §5.5): 3×3 stem, no stem max-pool, ReLU or Softplus(β) activations.
- **torchvision ResNet-34 / VGG-16-BN** with ImageNet weights read from a local file (nothing is downloaded).
- **Two-head VGG-9** (seed 000 §5.2, E3): one ImageNet head and one scene head sharing the pre-final layer.

:func:`build_model` builds any of them from a config mapping and, unless ``fused: false``, swaps the fused
fastjac ops in with :func:`fastjac.convert`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._convert import convert

#: Layer configurations: channel counts of conv-BN-ReLU blocks, ``"M"`` = 2×2 max-pool.
VGG_CONFIGS: dict[str, list] = {
    "vgg4": [64, "M", 128, "M", 512, "M"],
    "vgg6": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],  # our choice (not in the seeds)
    "vgg9": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg11": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # our choice
}


def activation_factory(name: str = "relu", beta: float = 10.0) -> Callable[[], nn.Module]:
    """A constructor of the activation ``name`` (``"relu"`` or ``"softplus"`` with ``beta``)."""
    if name == "relu":
        return lambda: nn.ReLU(inplace=False)
    if name == "softplus":
        if not beta > 0:
            raise ValueError(f"activation beta must be positive, got {beta!r}")
        return lambda: nn.Softplus(beta=beta)
    raise ValueError(f"activation must be 'relu' or 'softplus', got {name!r}")


def scaled_vgg_config(config: list, width: float) -> list:
    """``config`` with every block's channel count multiplied by ``width`` (rounded, at least 1)."""
    return [c if c == "M" else max(1, round(c * width)) for c in config]


def _vgg_features(config: list, in_channels: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), activation()]
            channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-k with BatchNorm: ``features`` (conv-BN-ReLU blocks and max-pools), global average pool,
    ``classifier`` = one linear layer. Feature names are ``features.<i>`` (e.g. the second max-pool of VGG-9
    is ``features.7``)."""

    piecewise_linear = True  # forward: submodules, flatten, residual add (fastjac.nn.why_not_one_pass)

    def __init__(self, config: list, num_classes: int, in_channels: int = 3, activation: str = "relu",
                 beta: float = 10.0, dropout: float = 0.0):
        super().__init__()
        self.features = _vgg_features(config, in_channels, activation_factory(activation, beta))
        width = [c for c in config if c != "M"][-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(width, num_classes)
        self.width = width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-final representation (after pooling), shared by the heads of :class:`TwoHeadVGG`."""
        return self.dropout(torch.flatten(self.pool(self.features(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class TwoHeadVGG(VGG):
    """VGG with two linear heads on the same pre-final layer (seed 000 §5.2, E3): ``classifier`` (the target
    task, e.g. 67 scenes) and ``aux_classifier`` (e.g. the 1000 ImageNet classes matched to a teacher).

    ``forward(x)`` returns the target head and ``forward(x, both=True)`` (also :meth:`both`) ``(target, aux)``
    from one pass (through DistributedDataParallel too); :meth:`head` is a module computing only one head
    (for Jacobians of that head)."""

    def __init__(self, config: list, num_classes: int, aux_classes: int, **kwargs: Any):
        super().__init__(config, num_classes, **kwargs)
        self.aux_classifier = nn.Linear(self.width, aux_classes)

    def forward(self, x: torch.Tensor, both: bool = False):
        z = self.embed(x)
        return (self.classifier(z), self.aux_classifier(z)) if both else self.classifier(z)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, both=True)

    def head(self, name: str) -> nn.Module:
        """A module sharing this model's parameters whose output is head ``name`` (``"target"`` or ``"aux"``)."""
        if name not in ("target", "aux"):
            raise ValueError(f"head must be 'target' or 'aux', got {name!r}")
        return _Head(self, name)


class _Head(nn.Module):
    piecewise_linear = True  # forward: submodules, flatten, residual add (fastjac.nn.why_not_one_pass)

    def __init__(self, model: TwoHeadVGG, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        z = self.model.embed(x)
        return (self.model.classifier if self.name == "target" else self.model.aux_classifier)(z)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs with BatchNorm, identity or 1×1 projection shortcut)."""

    piecewise_linear = True  # forward: submodules, flatten, residual add (fastjac.nn.why_not_one_pass)

    def __init__(self, cin: int, cout: int, stride: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = activation()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-18/34 for 32×32 inputs (thesis §5.5): 3×3 stem without max-pool, four stages of basic blocks
    (64, 128, 256, 512 channels), global average pool, linear layer; ReLU or Softplus(β) activations."""

    BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

    piecewise_linear = True  # forward: submodules, flatten, residual add (fastjac.nn.why_not_one_pass)

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, activation: str = "relu",
                 beta: float = 10.0):
        super().__init__()
        if depth not in self.BLOCKS:
            raise ValueError(f"resnet depth must be one of {sorted(self.BLOCKS)}, got {depth!r}")
        act = activation_factory(activation, beta)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = act()
        stages, cin = [], 64
        for i, (n, cout) in enumerate(zip(self.BLOCKS[depth], (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, act))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_weights(model: nn.Module, path: str | os.PathLike, what: str) -> nn.Module:
    """Load a state dict from the local file ``path`` into ``model`` (strict); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file {path!r} does not exist (nothing is downloaded; put the "
                                f"file there or set the config's weights path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a bad file
        raise ValueError(f"{what}: cannot read weights file {path!r}: {exc}") from exc
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{what}: weights file {path!r} does not fit the model: {exc}") from exc
    return model


def _torchvision(name: str, num_classes: int, weights: str | None) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return load_weights(model, weights, f"torchvision {name}") if weights else model


_ARCHS = ("vgg4", "vgg6", "vgg9", "vgg11", "resnet18", "resnet34", "tv_resnet34", "tv_vgg16_bn")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build a model from a config mapping.

    Keys: ``arch`` (one of ``vgg4 vgg6 vgg9 vgg11 resnet18 resnet34 tv_resnet34 tv_vgg16_bn``),
    ``num_classes``, optional ``in_channels`` (3), ``activation`` (``relu``/``softplus``), ``beta`` (10),
    ``dropout`` (VGG, 0), ``width`` (VGG: channel multiplier of every block, 1; e.g. 0.25 gives VGG-4
    ``16 M 32 M 128 M``, for the 8×8 digits), ``aux_classes`` (VGG: adds the second head of :class:`TwoHeadVGG`), ``weights``
    (a local file, torchvision models or any model), ``fused`` (True: :func:`fastjac.convert` the model).
    """
    allowed = {"arch", "num_classes", "in_channels", "activation", "beta", "dropout", "width", "aux_classes",
               "weights", "fused"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"model: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    arch = spec.get("arch")
    if arch not in _ARCHS:
        raise ValueError(f"model.arch must be one of {list(_ARCHS)}, got {arch!r}")
    num_classes = spec.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"model.num_classes must be a positive integer, got {num_classes!r}")
    common = dict(in_channels=spec.get("in_channels", 3), activation=spec.get("activation", "relu"),
                  beta=spec.get("beta", 10.0))
    weights = spec.get("weights")
    width = spec.get("width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"model.width must be a positive number (channel multiplier), got {width!r}")
    if width != 1.0 and not arch.startswith("vgg"):
        raise ValueError(f"model.width applies to the VGG architectures only, got it for {arch!r}")
    if arch.startswith("vgg"):
        kwargs = dict(common, dropout=spec.get("dropout", 0.0))
        aux = spec.get("aux_classes")
        layers = scaled_vgg_config(VGG_CONFIGS[arch], width)
        model = (TwoHeadVGG(layers, num_classes, aux, **kwargs) if aux else VGG(layers, num_classes, **kwargs))
    elif arch.startswith("resnet"):
        model = CifarResNet(int(arch[len("resnet"):]), num_classes, **common)
    else:
        model = _torchvision(arch[len("tv_"):], num_classes, weights)
        weights = None
    if weights:
        load_weights(model, weights, f"model {arch}")
    return convert(model) if spec.get("fused", True) else model


def check_input_fits(spec: Mapping[str, Any], shape: tuple[int, int, int]) -> None:
    """A ValueError naming ``data.channels`` or ``data.image_size`` when the model of ``spec`` cannot take
    ``(N, *shape)`` images (built on the meta device without its weights: nothing is read or computed)."""
    spec = {k: v for k, v in spec.items() if k not in ("weights", "fused")}
    key = (repr(sorted(spec.items())), tuple(shape))
    if key in _FITS:
        return
    channels, height, width = shape
    expected = 3 if str(spec.get("arch", "")).startswith("tv_") else spec.get("in_channels", 3)
    if expected != channels:
        raise ValueError(f"model.in_channels is {expected} (the model's input channels), but data.channels is "
                         f"{channels}")
    with torch.device("meta"):
        model = build_model(dict(spec, fused=False))
        try:
            model.eval()(torch.empty(2, channels, height, width))
        except RuntimeError as exc:
            raise ValueError(f"{spec.get('arch')} cannot take {height}x{width} images (data.image_size {height}; "
                             f"too small for its pooling?): {exc}") from None
    _FITS.add(key)


_FITS: set = set()  # (spec, shape) pairs already checked
