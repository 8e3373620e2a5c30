"""Offline loaders on synthetic data written in the real on-disk formats, incl. missing / corrupt files."""
import os
import pickle

import pytest
import torch

from fastjac.training import data, synthetic


@pytest.mark.parametrize("name,n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_round_trip(tmp_path, name, n_classes):
    synthetic.write_cifar(str(tmp_path), name, n_train=200, n_test=100, seed=1)
    train = data.load_dataset(name, "train", str(tmp_path))
    test = data.load_dataset(name, "test", str(tmp_path))
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 100 and len(train.classes) == n_classes
    assert int(train.labels.max()) < n_classes
    assert train.classes[1] == "class1"


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar(str(tmp_path), "cifar10", "train")
    folder = synthetic.write_cifar(str(tmp_path), "cifar10", n_train=50, n_test=10)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar(str(tmp_path), "cifar10", "train")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar(str(tmp_path), "cifar10", "test")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": [[1, 2, 3]], "labels": [0]}, f)
    with pytest.raises(ValueError, match="expected uint8 N x 3072"):
        data.load_cifar(str(tmp_path), "cifar10", "test")


def test_mit_indoor(tmp_path):
    synthetic.write_mit_indoor(str(tmp_path), n_classes=3, train_per_class=4, test_per_class=2, seed=0)
    train = data.load_mit_indoor(str(tmp_path), "train", image_size=32)
    test = data.load_mit_indoor(str(tmp_path), "test", image_size=32)
    assert train.images.shape == (12, 3, 32, 32) and len(test) == 6
    assert train.classes == ["scene0", "scene1", "scene2"]
    assert torch.equal(torch.bincount(train.labels), torch.tensor([4, 4, 4]))


def test_mit_indoor_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="Images"):
        data.load_mit_indoor(str(tmp_path), "train")
    synthetic.write_mit_indoor(str(tmp_path), n_classes=2, train_per_class=2, test_per_class=1)
    os.remove(tmp_path / "Images" / "scene1" / "0.jpg")
    with pytest.raises(FileNotFoundError, match="0.jpg"):
        data.load_mit_indoor(str(tmp_path), "train", image_size=16)
    (tmp_path / "Images" / "scene1" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        data.load_mit_indoor(str(tmp_path), "train", image_size=16)
    (tmp_path / "TestImages.txt").write_text("unknown/1.jpg\n")
    with pytest.raises(ValueError, match="unknown"):
        data.load_mit_indoor(str(tmp_path), "test", image_size=16)
    os.remove(tmp_path / "TrainImages.txt")
    with pytest.raises(FileNotFoundError, match="TrainImages.txt"):
        data.load_mit_indoor(str(tmp_path), "train")


def test_digits_split_is_stratified_and_disjoint():
    train = data.load_digits("train", image_size=16, seed=0)
    test = data.load_digits("test", image_size=16, seed=0)
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 16, 16) and 0 <= train.images.min() and train.images.max() <= 1
    counts = torch.bincount(test.labels)
    assert counts.min() >= 40 and counts.max() <= 50
    assert data.load_digits("test", image_size=16, channels=3, seed=0).images.shape[1] == 3
    torch.testing.assert_close(data.load_digits("test", image_size=16, seed=0).images, test.images)


def test_stratified_subset_reproducible():
    labels = torch.arange(100) % 10
    a = data.stratified_subset(labels, 3, seed=5)
    assert len(a) == 30 and torch.equal(torch.bincount(labels[a]), torch.full((10,), 3))
    assert torch.equal(a, data.stratified_subset(labels, 3, seed=5))
    assert not torch.equal(a, data.stratified_subset(labels, 3, seed=6))
    with pytest.raises(ValueError, match="class"):
        data.stratified_subset(labels, 11, seed=0)


def test_augment_is_a_crop_and_flip_drawn_from_the_generator():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    a = data.augment(x, torch.Generator().manual_seed(0), crop_padding=2)
    b = data.augment(x, torch.Generator().manual_seed(0), crop_padding=2)
    assert torch.equal(a, b) and a.shape == x.shape
    none = data.augment(x, torch.Generator().manual_seed(0), crop_padding=0, flip=False)
    assert torch.equal(none, x)
    # every output row is a (possibly flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 6], a[i]) or
                torch.equal(padded[i, :, dy:dy + 6, dx:dx + 6].flip(-1), a[i])]
        assert hits


def test_normalize():
    x = torch.rand(2, 3, 4, 4)
    mean, std = data.NORMALIZATION["cifar10"]
    torch.testing.assert_close(data.normalize(x, "cifar10")[:, 1], (x[:, 1] - mean[1]) / std[1])
    with pytest.raises(ValueError, match="imagenet21k"):
        data.normalize(x, "imagenet21k")
