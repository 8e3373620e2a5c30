"""Models of the experiments: shapes, layer configurations, activations, conversion, local weights."""
import pytest
import torch
from torch import nn

import fastjac
from fastjac.training.models import VGG_CONFIGS, TwoHeadVGG, build_model


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("arch,n_conv", [("vgg4", 3), ("vgg6", 5), ("vgg9", 8), ("vgg11", 10)])
def test_vgg_configs(arch, n_conv):
    model = build_model({"arch": arch, "num_classes": 7, "fused": False})
    assert len(_convs(model)) == n_conv
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == VGG_CONFIGS[arch].count("M")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_vgg9_matches_the_catalogue():
    widths = [c.out_channels for c in _convs(build_model({"arch": "vgg9", "num_classes": 10, "fused": False}))]
    assert widths == [64, 128, 256, 256, 512, 512, 512, 512]


@pytest.mark.parametrize("arch,n_blocks", [("resnet18", 8), ("resnet34", 16)])
def test_cifar_resnet(arch, n_blocks):
    model = build_model({"arch": arch, "num_classes": 5, "activation": "softplus", "beta": 10, "fused": False})
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == n_blocks
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    softplus = [m for m in model.modules() if isinstance(m, nn.Softplus)]
    assert softplus and all(m.beta == 10 for m in softplus)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_fused_by_default_and_same_function():
    torch.manual_seed(0)
    plain = build_model({"arch": "vgg4", "num_classes": 10, "fused": False}).eval()
    fused = build_model({"arch": "vgg4", "num_classes": 10}).eval()
    assert any(isinstance(m, fastjac.nn.BatchNormReLU2d) for m in fused.modules())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


def test_two_heads_share_the_pre_final_layer():
    model = build_model({"arch": "vgg9", "num_classes": 67, "aux_classes": 1000, "fused": False}).eval()
    assert isinstance(model, TwoHeadVGG)
    x = torch.randn(2, 3, 32, 32)
    target, aux = model.both(x)
    assert target.shape == (2, 67) and aux.shape == (2, 1000)
    torch.testing.assert_close(model(x), target)
    torch.testing.assert_close(model.head("aux")(x), aux)
    assert {id(p) for p in model.head("aux").parameters()} <= {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="head"):
        model.head("imagenet")


def test_weights_from_a_local_file(tmp_path):
    src = build_model({"arch": "vgg4", "num_classes": 3, "fused": False})
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    loaded = build_model({"arch": "vgg4", "num_classes": 3, "weights": str(path)})
    for a, b in zip(src.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model({"arch": "tv_resnet34", "num_classes": 1000, "weights": str(tmp_path / "missing.pth")})
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        build_model({"arch": "vgg4", "num_classes": 3, "weights": str(tmp_path / "bad.pth")})
    with pytest.raises(ValueError, match="does not fit"):
        build_model({"arch": "vgg9", "num_classes": 3, "weights": str(path)})


def test_torchvision_teacher_from_local_weights(tmp_path):
    import torchvision

    ref = torchvision.models.resnet34(weights=None)
    path = tmp_path / "resnet34-b627a593.pth"
    torch.save(ref.state_dict(), path)
    model = build_model({"arch": "tv_resnet34", "num_classes": 1000, "weights": str(path), "fused": False}).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), ref.eval()(x))


@pytest.mark.parametrize("spec,match", [
    ({"arch": "vgg5", "num_classes": 3}, "model.arch"),
    ({"arch": "vgg4", "num_classes": 0}, "num_classes"),
    ({"arch": "vgg4", "num_classes": 3, "activation": "tanh"}, "activation"),
    ({"arch": "vgg4", "num_classes": 3, "widht": 2}, "widht"),
])
def test_bad_model_config(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec)
