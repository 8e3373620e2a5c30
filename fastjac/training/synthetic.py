"""Small synthetic datasets written in the real on-disk formats (for tests and smoke configs).

Images are class-dependent (a per-class colour offset plus noise), so a model can learn them quickly.
:func:`write_smoke_data` (``fastjac synth DIR``) writes everything the ``smoke_*`` configs read from
``--data-root``.
"""
from __future__ import annotations

import os
import pickle

import numpy as np


def _class_images(rng: np.random.Generator, labels: np.ndarray, n_classes: int, shape) -> np.ndarray:
    base = rng.integers(40, 216, size=(n_classes, shape[0], 1, 1))
    noise = rng.normal(0, 25, size=(len(labels),) + tuple(shape))
    return np.clip(base[labels] + noise, 0, 255).astype(np.uint8)


def write_cifar(root: str, name: str = "cifar10", n_train: int = 100, n_test: int = 50, seed: int = 0) -> str:
    """Write a CIFAR-10 (``cifar-10-batches-py``, 5 train batches) or CIFAR-100 (``cifar-100-python``) folder
    of random class-dependent images under ``root``; returns the folder."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")

    def batch(n, key):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        data = _class_images(rng, labels, n_classes, (3, 32, 32)).reshape(n, 3072)
        return {"data": data, key: labels.tolist()}

    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        parts = np.array_split(np.arange(n_train), 5)
        files = {f"data_batch_{i + 1}": batch(len(p), "labels") for i, p in enumerate(parts)}
        files["test_batch"] = batch(n_test, "labels")
        files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        files = {"train": batch(n_train, "fine_labels"), "test": batch(n_test, "fine_labels"),
                 "meta": {"fine_label_names": [f"class{i}" for i in range(100)]}}
    for fname, content in files.items():
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(content, f)
    return folder


def write_mit_indoor(root: str, n_classes: int = 3, train_per_class: int = 4, test_per_class: int = 2,
                     size: tuple[int, int] = (40, 48), seed: int = 0) -> str:
    """Write an MIT-Indoor-format folder: ``Images/<class>/<i>.jpg``, ``TrainImages.txt``, ``TestImages.txt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(n_classes):
        cls = f"scene{c}"
        os.makedirs(os.path.join(root, "Images", cls), exist_ok=True)
        labels = np.full(train_per_class + test_per_class, c)
        images = _class_images(rng, labels, n_classes, (3,) + tuple(size))
        for i, img in enumerate(images):
            rel = f"{cls}/{i}.jpg"
            Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(root, "Images", rel), quality=95)
            (train if i < train_per_class else test).append(rel)
    for fname, lines in (("TrainImages.txt", train), ("TestImages.txt", test)):
        with open(os.path.join(root, fname), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def write_imagenet(root: str, n_classes: int = 3, train_per_class: int = 2, val_per_class: int = 2,
                   size: tuple[int, int] = (40, 48), seed: int = 0) -> str:
    """Write an ImageNet ImageFolder tree: ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/<wnid>/<wnid>_<i>.JPEG``
    (wnids ``n00000000``, ``n00000001``, ...) of small class-dependent JPEGs; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = ["train"] * (n_classes * train_per_class) + ["val"] * (n_classes * val_per_class)
    labels = np.concatenate([np.repeat(np.arange(n_classes), train_per_class),
                             np.repeat(np.arange(n_classes), val_per_class)])
    images = _class_images(rng, labels, n_classes, (3,) + tuple(size))  # one colour per class in both splits
    for i, (split, label, img) in enumerate(zip(splits, labels, images)):
        wnid = f"n{label:08d}"
        folder = os.path.join(root, split, wnid)
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=95)
    return root


def write_smoke_data(root: str) -> list[str]:
    """Everything the ``smoke_*`` configs read from ``--data-root``: synthetic CIFAR-100 and CIFAR-10, MIT Indoor
    and ImageNet folders, and a randomly initialised (not pretrained) torchvision ResNet-34 weights file named
    like the published one (the configs' ``teacher``/``model.weights``). Returns the paths written."""
    import torch
    import torchvision

    os.makedirs(root, exist_ok=True)
    paths = [write_cifar(root, "cifar100", n_train=100, n_test=20, seed=0),
             write_cifar(root, "cifar10", n_train=50, n_test=20, seed=1),
             write_mit_indoor(root, n_classes=3, train_per_class=4, test_per_class=2, size=(72, 80), seed=2),
             write_imagenet(root, n_classes=3, train_per_class=1, val_per_class=2, size=(40, 48), seed=3)]
    torch.manual_seed(0)
    weights = os.path.join(root, "resnet34-b627a593.pth")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    return paths + [weights]
