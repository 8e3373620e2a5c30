"""Features by layer name, attention maps and matching (000 Eq. 8-9), attention-Jacobian matching (§5.2.1,
Table 5) against brute force; torchvision ResNet-34 and a Sequential VGG; plain and converted."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastjac
from fastjac import losses
from _jacobian_helpers import D, converted, frozen_reference, per_sample_jacobian, randomize_bn_

pytestmark = pytest.mark.usefixtures("single_thread")


def cnn(channels: int, seed: int) -> nn.Module:
    """6 x 6 inputs; layer "5" (ReLU) gives an N x channels x 6 x 6 feature."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.Softplus(beta=2.0),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 9, 5),
    ).to(D)
    return randomize_bn_(net, seed)


def vgg(cfg=(8, "M", 16, "M", 16), classes=5) -> nn.Module:
    """VGG-k layout (EXPERIMENTS.md): conv3x3 -> BN -> ReLU blocks, M = max-pool, GAP, one linear layer."""
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(OrderedDict(features=nn.Sequential(*layers), pool=nn.AdaptiveAvgPool2d(1),
                                     flatten=nn.Flatten(), fc=nn.Linear(c, classes)))


def test_attention_map_and_matching_values():
    gen = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 4, 5, 5, generator=gen, dtype=D), torch.randn(3, 7, 5, 5, generator=gen, dtype=D)
    a_s, a_t = losses.attention_map(zs), losses.attention_map(zt)
    torch.testing.assert_close(a_s, zs.pow(2).sum(1))
    diff = F.normalize(a_t.flatten(1), dim=1) - F.normalize(a_s.flatten(1), dim=1)
    torch.testing.assert_close(losses.attention_matching(a_s, a_t, reduction="none"), diff.norm(dim=1))
    torch.testing.assert_close(losses.attention_matching(a_s, a_t, squared=True), diff.pow(2).sum(1).mean())
    for student in (a_t.clone(), torch.zeros_like(a_t)):  # exact match, all-zero map
        student.requires_grad_(True)
        loss = losses.attention_matching(student, a_t)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match=r"a_student \(student attention map\) has shape"):
        losses.attention_matching(a_s, a_t[:, :4])
    with pytest.raises(ValueError, match="features must be N x C x"):
        losses.attention_map(torch.zeros(3, 4))


def test_pool_attention_windows():
    a = torch.randn(2, 10, 10, dtype=D)
    torch.testing.assert_close(losses.pool_attention(a, 0.2), F.avg_pool2d(a[:, None], 2, stride=1)[:, 0])
    torch.testing.assert_close(losses.pool_attention(a, 1 / 3), F.avg_pool2d(a[:, None], 3, stride=1)[:, 0])
    torch.testing.assert_close(losses.pool_attention(a, "full"), a.mean((1, 2))[:, None, None])
    torch.testing.assert_close(losses.pool_attention(a, None), a)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="window must be a fraction"):
            losses.pool_attention(a, bad)


def test_features_by_name_on_resnet34_are_differentiable_twice():
    net = torchvision.models.resnet34(weights=None).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with losses.capture_features(net, ["layer1", "layer2.0.conv1"]) as feats:
        logits = net(x)
    assert feats["layer1"].shape == (2, 64, 8, 8) and feats["layer2.0.conv1"].shape == (2, 128, 4, 4)
    assert logits.shape == (2, 1000)
    (g,) = torch.autograd.grad(losses.attention_map(feats["layer1"]).sum(), x, create_graph=True)
    g.pow(2).sum().backward()  # double backward through the hooked feature
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
    assert not net.layer1[0].conv1._forward_hooks  # hooks removed on exit
    plain = feats["layer1"].detach()
    fast = converted(net)
    with torch.no_grad(), losses.capture_features(fast, "layer1") as feats:
        fast(x)
    torch.testing.assert_close(feats["layer1"], plain, rtol=1e-4, atol=1e-5)
    with pytest.raises(losses.LayerNotFoundError, match=r"'layer5' not found in ResNet\. Did you mean .*'layer1'"):
        with losses.capture_features(net, "layer5"):
            pass


def test_features_by_name_on_sequential_vgg_plain_and_converted():
    net = vgg()
    randomize_bn_(net.to(D), 0)
    x = torch.randn(2, 3, 16, 16, dtype=D)
    values = []
    for model in (net, converted(net)):  # converted: BN+ReLU fused, ReLU slots become Identity
        with losses.capture_features(model, ["features.2", "features.7"]) as feats:
            model(x)
        values.append({k: v.clone() for k, v in feats.items()})
    assert values[0]["features.7"].shape == (2, 16, 4, 4)  # after the second max-pool
    for key in values[0]:
        torch.testing.assert_close(values[1][key], values[0][key])
    with pytest.raises(losses.LayerNotFoundError, match=r"'features\.99' not found in Sequential"):
        with losses.capture_features(net, "features.99"):
            pass


def brute_force_attention_jacobian(student, teacher, x, layer, window):
    """Loss of §5.2.1 from autograd.functional.jacobian of hand-written pooled-attention heads."""
    k = max(1, round(window * 6))

    def head(net):
        return lambda xx: F.avg_pool2d(net[: int(layer) + 1](xx).pow(2).sum(1, keepdim=True), k, stride=1).flatten(1)

    with torch.no_grad():
        position = head(teacher)(x).argmax(1)
    rows = torch.arange(len(x))
    j_t = per_sample_jacobian(head(teacher), x)[rows, position]
    j_s = per_sample_jacobian(head(student), x, create_graph=True)[rows, position]
    unit = lambda j: j.flatten(1) / j.flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    return (unit(j_s) - unit(j_t)).pow(2).sum(1).mean()


@pytest.mark.parametrize("window", [1 / 3, 0.2])
def test_attention_jacobian_matching_matches_brute_force(window):
    teacher, student = cnn(6, 1).eval(), cnn(3, 2).eval()
    x = torch.randn(3, 2, 6, 6, dtype=D)
    want = brute_force_attention_jacobian(student, teacher, x, "5", window)
    want_grads = torch.autograd.grad(want, list(student.parameters()), allow_unused=True, materialize_grads=True)
    for net in (student, converted(student)):
        got = losses.attention_jacobian_matching(net, teacher, x, "5", "5", window=window)
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got, list(net.parameters()), allow_unused=True, materialize_grads=True)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)


def test_attention_jacobian_matching_in_training_mode_uses_the_step_statistics():
    """Student in training mode with the statistics of its ordinary forward: the loss equals the brute-force
    loss of the frozen-statistics student, the running statistics are updated only by that forward, and
    plain and converted students agree."""
    teacher = cnn(6, 1).eval()
    x = torch.randn(4, 2, 6, 6, dtype=D)
    results = []
    for make in (lambda: cnn(3, 2), lambda: converted(cnn(3, 2))):
        student = make().train()
        with fastjac.record_batch_norm_stats(student) as stats:
            student(x)
        state = copy.deepcopy(student.state_dict())
        loss = losses.attention_jacobian_matching(student, teacher, x, "5", "5", student_stats=stats)
        for key, value in student.state_dict().items():
            torch.testing.assert_close(value, state[key])
        results.append(loss)
    torch.testing.assert_close(results[1], results[0])
    reference = frozen_reference(cnn(3, 2).train(), x)
    torch.testing.assert_close(results[0], brute_force_attention_jacobian(reference, teacher, x, "5", 0.2))


def test_attention_jacobian_matching_resnet34_teacher_vgg_student_and_errors():
    teacher = torchvision.models.resnet34(weights=None).eval()
    student = fastjac.convert(vgg())
    x = torch.randn(2, 3, 32, 32)
    loss = losses.attention_jacobian_matching(student, teacher, x, "features.7", "layer1")  # both 8 x 8
    loss.backward()
    assert torch.isfinite(loss)
    assert student.features[0].weight.grad is not None and torch.isfinite(student.features[0].weight.grad).all()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"layer 'features.3' has spatial size \(16, 16\) but teacher layer 'layer1' has \(8, 8\)"):
        losses.attention_jacobian_matching(student, teacher, x, "features.3", "layer1")
    with pytest.raises(losses.LayerNotFoundError, match="'layer9' not found"):
        losses.attention_jacobian_matching(student, teacher, x, "features.7", "layer9")
