"""Saliency methods (thesis Ch. 3, issue 5): FullGrad (Eq. 3.2) and its baselines, exact relations and errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastjac
from fastjac.saliency_maps import METHODS, full_gradient_maps, save_saliency_grid
from fastjac.saliency_maps.fullgrad import fullgrad_aggregate
from fastjac.saliency_maps.gradcam import default_gradcam_layer
from fastjac.saliency_maps.integrated_gradients import integrated_gradients_attribution
from fastjac.saliency_maps.postprocess import rescale_unit
from fastjac.training.data import load_digits
from fastjac.training.models import build_model

from _jacobian_helpers import randomize_bn_
from _trained_models import digits_data, trained_digits_model

# Cheap options so that every method runs in well under a second on the small models.
CHEAP = {"integrated_gradients": {"steps": 3}, "smoothgrad": {"samples": 3},
         "smoothgrad_squared": {"samples": 3}}
RANDOM_METHODS = ("random", "smoothgrad", "smoothgrad_squared")


def _small_vgg(activation: str = "relu") -> nn.Module:
    torch.manual_seed(0)
    model = build_model({"arch": "vgg4", "num_classes": 5, "in_channels": 3, "activation": activation})
    return randomize_bn_(model, 0).eval()


def _check_complete(model: nn.Module, x: torch.Tensor) -> None:
    input_term, bias_gradients = full_gradient_maps(model, x)
    out = model(x)
    value = out.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    total = input_term.flatten(1).sum(1) + sum(b.flatten(1).sum(1) for b in bias_gradients.values())
    bias_part = sum(b.flatten(1).sum(1).abs() for b in bias_gradients.values())
    assert (bias_part > 1e-3 * value.abs()).all()  # the bias terms matter: not just homogeneity
    torch.testing.assert_close(total, value.detach(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- FullGrad: completeness and Eq. 3.2 ---------

def test_fullgrad_decomposition_is_complete_on_the_digits_vgg4():
    model = trained_digits_model().double()
    x = digits_data()[2][:16].double()
    _check_complete(model, x)
    _, bias_gradients = full_gradient_maps(model, x)
    assert [n for n, b in bias_gradients.items() if b.dim() == 4] == ["features.1", "features.5", "features.9"]


@pytest.mark.parametrize("name", ["torchvision_resnet18", "our_resnet18"])
def test_fullgrad_decomposition_is_complete_on_residual_nets(name):
    torch.manual_seed(0)
    if name == "torchvision_resnet18":
        model, size = torchvision.models.resnet18(num_classes=7), 32
    else:
        model, size = build_model({"arch": "resnet18", "num_classes": 7, "in_channels": 3}), 8
    model = randomize_bn_(model, 0).eval().double()
    _check_complete(model, torch.randn(2, 3, size, size, dtype=torch.float64))


def test_fullgrad_map_is_eq_3_2_per_channel():
    """Independent evaluation of Eq. 3.2: ψ per channel map (abs, min-max, upsample each) summed."""
    model, x = _small_vgg(), torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 3])
    input_term, bias_gradients = full_gradient_maps(model, x, target)
    expected = []
    for n in range(2):
        a = input_term[n].abs().sum(0)
        total = (a - a.min()) / (a.max() - a.min())
        for b in bias_gradients.values():
            if b.dim() != 4:
                continue
            for c in range(b.shape[1]):
                m = b[n, c].abs()
                span = m.max() - m.min()
                m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
                total = total + F.interpolate(m[None, None], size=(16, 16), mode="bilinear")[0, 0]
        expected.append(total)
    got = fastjac.saliency(model, x, target, method="fullgrad")
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-4)
    # rescale="layer": the layer's C×h×w maps rescaled jointly; each layer then adds at most C per pixel.
    by_layer = fastjac.saliency(model, x, target, method="fullgrad", rescale="layer")
    assert not torch.allclose(by_layer, got)
    manual = rescale_unit(input_term.abs().sum(1, keepdim=True), (2, 3))
    for b in bias_gradients.values():
        if b.dim() == 4:
            manual = manual + F.interpolate(rescale_unit(b.abs(), (1, 2, 3)), size=(16, 16),
                                            mode="bilinear").sum(1, keepdim=True)
    torch.testing.assert_close(by_layer, manual.squeeze(1), rtol=1e-5, atol=1e-4)


def test_fullgrad_layers_option_and_zero_maps():
    model, x = _small_vgg(), torch.randn(2, 3, 16, 16)
    one = fastjac.saliency(model, x, method="fullgrad", layers=["features.5"])
    input_term, bias_gradients = full_gradient_maps(model, x, layers=["features.5"])
    assert list(bias_gradients) == ["features.5"]
    torch.testing.assert_close(one, fullgrad_aggregate(input_term, bias_gradients))
    # A zero (or constant, or 1x1) map rescales to 0, not NaN.
    zeros = fullgrad_aggregate(torch.zeros(1, 3, 4, 4), {"a": torch.zeros(1, 2, 2, 2), "b": torch.ones(1, 1, 1, 1)})
    assert torch.equal(zeros, torch.zeros(1, 4, 4))


# ---------------------------------------------------------------- baselines: exact relations ----------------

def test_integrated_gradients_completeness():
    """Σ IG → f(x) − f(x') with the midpoint rule's O(steps⁻²) error, on a smooth (Softplus, no max-pool) net:
    measured relative errors 8e-5 / 2e-5 (8 / 16 steps) and 2e-4 / 6e-5 for the two samples, ratio 4.0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    x = 2 * torch.randn(2, 3, 8, 8, dtype=torch.float64)
    baseline = 0.3 * torch.randn(3, 8, 8, dtype=torch.float64)  # one image, broadcast over the batch
    with torch.no_grad():
        diffs = model(x) - model(baseline.expand_as(x))
    target = diffs.abs().argmax(1)
    diff = diffs.gather(1, target[:, None]).squeeze(1)
    errors = []
    for steps in (8, 16):
        ig = integrated_gradients_attribution(model, x, target, baseline=baseline, steps=steps)
        errors.append(((ig.flatten(1).sum(1) - diff) / diff).abs())
    assert (errors[1] < 2e-4).all()
    ratio = errors[0] / errors[1]
    assert ((ratio > 3.5) & (ratio < 4.5)).all(), ratio
    got = fastjac.saliency(model, x, target, method="integrated_gradients", baseline=baseline, steps=16)
    torch.testing.assert_close(got, ig.abs().sum(1))


def test_integrated_gradients_is_exact_for_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 4)).double().eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    ig = integrated_gradients_attribution(model, x, target, baseline=0.5, steps=1)
    w = model[1].weight[target].view(3, 2, 5, 5)
    torch.testing.assert_close(ig, (x - 0.5) * w.detach())


def test_smoothgrad_without_noise_is_the_input_gradient():
    model, x = _small_vgg(), torch.randn(3, 3, 16, 16)
    grad = fastjac.saliency(model, x, method="input_gradient")
    sg = fastjac.saliency(model, x, method="smoothgrad", noise_level=0.0, samples=2)
    torch.testing.assert_close(sg, grad, rtol=1e-6, atol=0)
    x_req = x.clone().requires_grad_(True)
    out = model(x_req)
    (g,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), x_req)
    sq = fastjac.saliency(model, x, method="smoothgrad_squared", noise_level=0.0, samples=2)
    torch.testing.assert_close(sq, g.square().sum(1), rtol=1e-6, atol=0)


def test_smoothgrad_noise_has_the_stated_scale():
    """With f(x) = Σ w ⊙ x², ∇f = 2 w ⊙ x, so SG-squared = Σ_c 4 w² (x² + σ²) on average: σ is recovered."""
    torch.manual_seed(0)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(1, 2, 4, 4, dtype=torch.float64) + 0.5)

        def forward(self, x):
            return (self.w * x.square()).flatten(1).sum(1, keepdim=True)

    model, x = Quadratic(), torch.rand(2, 2, 4, 4, dtype=torch.float64)
    got = fastjac.saliency(model, x, method="smoothgrad_squared", samples=4000, noise_level=0.2)
    sigma = 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    expected = (4 * model.w.detach().square() * (x.square() + sigma.view(-1, 1, 1, 1) ** 2)).sum(1)
    # 4000 samples: relative standard error of each pixel's mean about 2-3 %.
    torch.testing.assert_close(got.mean((1, 2)), expected.mean((1, 2)), rtol=0.03, atol=0)


def test_gradcam_matches_a_hand_computed_reference():
    """conv → ReLU → global average pool → linear: ∂y_c/∂A^k_ij = W[c, k] / (h w), so the map is
    ReLU(Σ_k W[c, k] A^k / (h w)), upsampled bilinearly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4)).eval()
    x, target = torch.randn(2, 3, 12, 12), torch.tensor([2, 0])
    assert default_gradcam_layer(model, x) == "1"
    with torch.no_grad():
        a = torch.relu(model[0](x))
        w = model[4].weight[target] / (a.shape[2] * a.shape[3])
        cam = torch.relu((w[:, :, None, None] * a).sum(1, keepdim=True))
        expected = F.interpolate(cam, size=(12, 12), mode="bilinear", align_corners=False).squeeze(1)
    torch.testing.assert_close(fastjac.saliency(model, x, target, method="gradcam"), expected)
    torch.testing.assert_close(fastjac.saliency(model, x, target, method="gradcam", layer="1"), expected)
    # On the conv output itself (before the ReLU), the gradient is 0 where the ReLU is off.
    pre = fastjac.saliency(model, x, target, method="gradcam", layer="0")
    assert pre.shape == (2, 12, 12) and (pre >= 0).all()


def test_default_gradcam_layers():
    assert default_gradcam_layer(_small_vgg(), torch.randn(1, 3, 16, 16)) == "features.9"
    tv = torchvision.models.resnet18(num_classes=3).eval()
    assert default_gradcam_layer(tv, torch.randn(1, 3, 32, 32)) == "layer4.1.relu"


# ---------------------------------------------------------------- every method: contract --------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_shape_determinism_chunking_and_no_side_effects(method):
    model, x = _small_vgg(), torch.randn(3, 3, 16, 16)
    model.train()
    opts = CHEAP.get(method, {})
    maps = fastjac.saliency(model, x, method=method, seed=3, **opts)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert maps.shape == (3, 16, 16) and maps.dtype == x.dtype and maps.isfinite().all() and (maps >= 0).all()
    assert maps.flatten(1).amax(1).gt(0).all()
    torch.testing.assert_close(fastjac.saliency(model, x, method=method, seed=3, **opts), maps, rtol=0, atol=0)
    torch.testing.assert_close(fastjac.saliency(model, x, method=method, seed=3, batch_size=2, **opts), maps,
                               rtol=1e-5, atol=1e-6)
    other = fastjac.saliency(model, x, method=method, seed=4, **opts)
    assert torch.equal(other, maps) != (method in RANDOM_METHODS)


@pytest.mark.parametrize("arch, methods", [
    ("resnet18", sorted(METHODS)),
    ("vgg16_bn", ["fullgrad", "gradcam", "input_x_gradient"]),  # the rest only wrap input gradients
])
def test_methods_on_torchvision_models(arch, methods):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    for method in methods:
        maps = fastjac.saliency(model, x, method=method, **CHEAP.get(method, {}))
        assert maps.shape == (1, 32, 32) and maps.isfinite().all() and (maps >= 0).all(), method
    assert all(p.grad is None for p in model.parameters())


def test_softplus_resnet_runs():
    torch.manual_seed(0)
    model = build_model({"arch": "resnet18", "num_classes": 4, "in_channels": 3, "activation": "softplus"}).eval()
    x = torch.randn(2, 3, 8, 8)
    for method in ("fullgrad", "gradcam"):
        maps = fastjac.saliency(model, x, method=method)
        assert maps.shape == (2, 8, 8) and (maps >= 0).all() and maps.isfinite().all()


# ---------------------------------------------------------------- sanity on the trained digits model ------

def test_maps_put_more_mass_on_digit_strokes_than_the_random_map():
    """Fraction of map mass on stroke pixels (raw intensity > half the image's max) over the strokes' share
    of the area, mean over 200 test digits. Measured: fullgrad 1.25, input_gradient 1.20, random 1.00 (seeds
    0, 1: 1.003, 0.998; per-image ratios of the random map have std ~0.04, so its mean is 1 ± 0.01). The
    margin 0.1 is half the smallest measured gap."""
    model = trained_digits_model()
    x = digits_data()[2][:200]
    raw = load_digits("test", image_size=16, channels=1).float_images()[:200, 0]
    stroke = raw > 0.5 * raw.amax((1, 2), keepdim=True)
    area = stroke.float().mean((1, 2))

    def ratio(method):
        s = fastjac.saliency(model, x, method=method)
        return float(((s * stroke).sum((1, 2)) / s.sum((1, 2)) / area).mean())

    chance = ratio("random")
    assert abs(chance - 1) < 0.03
    assert ratio("fullgrad") > chance + 0.1
    assert ratio("input_gradient") > chance + 0.1


# ---------------------------------------------------------------- grids and bad arguments -------------------

def test_save_saliency_grid_writes_a_png(tmp_path):
    model, x = _small_vgg(), torch.randn(2, 3, 16, 16)
    maps = {m: fastjac.saliency(model, x, method=m) for m in ("fullgrad", "gradcam")}
    path = save_saliency_grid(x, maps, tmp_path / "sub" / "grid.png", mean=[0.5] * 3, std=[0.25] * 3)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    gray = save_saliency_grid(torch.randn(1, 1, 8, 8), {"random": torch.rand(1, 8, 8)}, tmp_path / "g.png")
    assert gray.endswith("g.png")
    with pytest.raises(ValueError, match=r"maps\['random'\]"):
        save_saliency_grid(x, {"random": torch.rand(3, 16, 16)}, tmp_path / "bad.png")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="nope"), ValueError, "method: unknown saliency method 'nope'"),
    (dict(method="gradcam", steps=3), TypeError, r"takes no option\(s\) \['steps'\]"),
    (dict(method="gradcam", layer="features.99"), ValueError, r"layer: .*'features.99' not found.*features"),
    (dict(method="gradcam", layer="classifier"), ValueError, "layer: 'classifier'.*expected a 4-D"),
    (dict(method="fullgrad", layers=["nope"]), ValueError, "layers: .*'nope' not found"),
    (dict(method="fullgrad", layers=["classifier"]), ValueError, "layers: .*no spatial"),
    (dict(method="fullgrad", rescale="pixel"), ValueError, "rescale: expected"),
    (dict(method="integrated_gradients", steps=0), ValueError, "steps: expected a positive integer"),
    (dict(method="integrated_gradients", baseline=torch.zeros(2, 3, 16, 16)), ValueError, "baseline: expected"),
    (dict(method="smoothgrad", noise_level=-0.1), ValueError, "noise_level: expected"),
    (dict(method="smoothgrad", samples=1.5), ValueError, "samples: expected"),
    (dict(method="fullgrad", target=torch.tensor([0, 1])), ValueError, r"target: expected .* shape \(3,\)"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    model, x = _small_vgg(), torch.randn(3, 3, 16, 16)
    with pytest.raises(error, match=match):
        fastjac.saliency(model, x, **kwargs)


def test_wrong_x_shape():
    with pytest.raises(ValueError, match=r"x: expected a floating-point tensor of shape \(N, C, H, W\)"):
        fastjac.saliency(_small_vgg(), torch.randn(3, 16, 16), method="fullgrad")
