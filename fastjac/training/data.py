"""Offline datasets: nothing is downloaded, every loader reads a standard on-disk layout under a data root.

- CIFAR-10 / CIFAR-100: the python-pickle folders ``cifar-10-batches-py`` (``data_batch_1..5``,
  ``test_batch``, key ``labels``) and ``cifar-100-python`` (``train``, ``test``, key ``fine_labels``).
- MIT Indoor 67: ``Images/<class>/<file>.jpg`` with the lists ``TrainImages.txt`` / ``TestImages.txt`` (one
  ``<class>/<file>.jpg`` per line); images are decoded with PIL and resized when a split is loaded.
- ImageNet (ILSVRC 2012) in torchvision's ImageFolder layout: ``root/train/<wnid>/*.JPEG`` and
  ``root/val/<wnid>/*.JPEG`` (the ``test`` split); classes are the sorted folder names. Images are resized
  (shorter side to ``image_size·256/224``, 256 at 224) and centre-cropped to ``image_size``; only the files a
  ``limit`` keeps are decoded (see :func:`imagenet_order`).
- scikit-learn's digits (bundled with scikit-learn, 1,797 8×8 images): the embedded real dataset, upsampled
  bilinearly to the model's input size, split into train/test by a seeded class-stratified draw.

Every loader returns an :class:`ImageSet` (uint8 or float images in memory, int64 labels). Missing or malformed
files raise errors that name the path and what was expected. :mod:`fastjac.training.synthetic` writes small
folders in these formats for the tests.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Per-channel (mean, std) of the training images, in [0, 1] units, used for normalisation.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mit_indoor": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics (teacher's input)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.3,), (0.4,)),  # about the mean/std of digits/16 (mostly background)
}


@dataclass
class ImageSet:
    """Images ``N x C x H x W`` (uint8 in [0, 255] or float in [0, 1]), labels ``N`` (int64), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255) if self.images.dtype == torch.uint8 else self.images.float()


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory {path!r} does not exist (nothing is downloaded; expected {what} "
                                "in its standard layout there)")


def _unpickle(path: str, keys: tuple[str, ...]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR: file {path!r} is missing (expected the python-pickle batch file)")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - truncated / not a pickle
        raise ValueError(f"CIFAR: cannot unpickle {path!r} (corrupted or not a CIFAR python batch): {exc}") from exc
    if not isinstance(batch, dict) or any(k not in batch for k in keys):
        raise ValueError(f"CIFAR: {path!r} is not a CIFAR python batch: expected a dict with keys {list(keys)}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or len(batch[keys[1]]) != len(data):
        raise ValueError(f"CIFAR: {path!r} holds data of shape {data.shape} / dtype {data.dtype} with "
                         f"{len(batch[keys[1]])} labels; expected uint8 N x 3072 with N labels")
    return batch


def load_cifar(root: str, name: str, split: str) -> ImageSet:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels), ``split`` ``train``/``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "cifar10":
        folder, files, key = "cifar-10-batches-py", (
            [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]), "labels"
        meta, meta_key = "batches.meta", "label_names"
    elif name == "cifar100":
        folder, files, key, meta, meta_key = "cifar-100-python", [split], "fine_labels", "meta", "fine_label_names"
    else:
        raise ValueError(f"dataset name must be 'cifar10' or 'cifar100', got {name!r}")
    base = os.path.join(root, folder)
    _require_dir(base, name)
    batches = [_unpickle(os.path.join(base, f), ("data", key)) for f in files]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    n_classes = 10 if name == "cifar10" else 100
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"CIFAR: labels in {base!r} outside [0, {n_classes})")
    classes = [str(i) for i in range(n_classes)]
    meta_path = os.path.join(base, meta)
    if os.path.isfile(meta_path):
        classes = list(_unpickle_meta(meta_path, meta_key, n_classes) or classes)
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels), classes)


def _unpickle_meta(path: str, key: str, n: int):
    try:
        with open(path, "rb") as f:
            names = pickle.load(f, encoding="latin1").get(key)
        return names if names is not None and len(names) == n else None
    except Exception:  # noqa: BLE001 - class names are optional
        return None


def _read_list(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MIT Indoor: split list {path!r} is missing (expected lines '<class>/<file>.jpg')")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    for line in lines:
        if line.count("/") != 1:
            raise ValueError(f"MIT Indoor: bad line {line!r} in {path!r}; expected '<class>/<file>.jpg'")
    return lines


def load_mit_indoor(root: str, split: str, image_size: int = 224) -> ImageSet:
    """MIT Indoor 67 from ``root/Images/<class>/*.jpg`` and ``root/{Train,Test}Images.txt``; images resized
    (shorter side to ``image_size``, then centre crop ``image_size``²), uint8."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_dir = os.path.join(root, "Images")
    _require_dir(images_dir, "MIT Indoor 67 (Images/<class>/<file>.jpg)")
    classes = sorted(d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d)))
    index = {c: i for i, c in enumerate(classes)}
    entries = _read_list(os.path.join(root, "TrainImages.txt" if split == "train" else "TestImages.txt"))
    out = torch.empty((len(entries), 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(len(entries), dtype=torch.long)
    for i, entry in enumerate(entries):
        cls = entry.split("/")[0]
        if cls not in index:
            raise ValueError(f"MIT Indoor: class {cls!r} of list entry {entry!r} has no folder in {images_dir!r}")
        path = os.path.join(images_dir, entry)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MIT Indoor: image {path!r} listed in the {split} split is missing")
        out[i] = _resize_center_crop(_decode_rgb(path, "MIT Indoor"), image_size)
        labels[i] = index[cls]
    return ImageSet(out, labels, classes)


def _resize_center_crop(img: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """Shorter side to ``resize`` (default ``size``), bilinear with antialiasing, then the centre ``size``² crop."""
    _, h, w = img.shape
    resize = size if resize is None else resize
    scale = resize / min(h, w)
    nh, nw = max(resize, round(h * scale)), max(resize, round(w * scale))
    resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[0, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _decode_rgb(path: str, what: str) -> torch.Tensor:
    """An image file as a uint8 ``3 x H x W`` tensor (errors name the file)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
        raise ValueError(f"{what}: cannot decode image {path!r}: {exc}") from exc
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")


def imagenet_order(files_per_class: list[list[str]], seed: int = 0) -> list[tuple[int, str]]:
    """The order in which ImageNet files are kept (so that a limit of N keeps the first N): each class's files
    (sorted names) are shuffled by one generator seeded with ``seed``, drawn class by class in sorted class order;
    then round-robin over the classes: the first file of every class, then the second of every class, ...
    A limit of N therefore keeps ``N // classes`` or one more images of each class (balanced)."""
    g = torch.Generator().manual_seed(seed)
    shuffled = [[files[i] for i in torch.randperm(len(files), generator=g).tolist()] for files in files_per_class]
    order, depth = [], max((len(f) for f in shuffled), default=0)
    for r in range(depth):
        order += [(c, files[r]) for c, files in enumerate(shuffled) if r < len(files)]
    return order


def load_imagenet(root: str, split: str, image_size: int = 224, limit: int | None = None,
                  seed: int = 0) -> ImageSet:
    """ImageNet from ``root/train/<wnid>/*`` (``split="train"``) or ``root/val/<wnid>/*`` (``"test"``): the
    first ``limit`` files (all when None) of :func:`imagenet_order`, each resized (shorter side to
    ``round(image_size·256/224)``) and centre-cropped to ``image_size``², uint8. Only the kept files are read."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    folder = os.path.join(root, "train" if split == "train" else "val")
    _require_dir(folder, f"ImageNet {split} split (<wnid>/<file>.JPEG folders)")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise FileNotFoundError(f"ImageNet: no class folders in {folder!r} (expected {folder}/<wnid>/<file>.JPEG)")
    files = [sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
             for c in classes]
    order = imagenet_order(files, seed)
    if not order:
        raise FileNotFoundError(f"ImageNet: no image files under {folder!r}")
    order = order[:limit] if limit is not None else order
    resize = round(image_size * 256 / 224)
    out = torch.empty((len(order), 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(len(order), dtype=torch.long)
    for i, (c, name) in enumerate(order):
        out[i] = _resize_center_crop(_decode_rgb(os.path.join(folder, classes[c], name), "ImageNet"), image_size,
                                     resize)
        labels[i] = c
    return ImageSet(out, labels, classes)


def load_digits(split: str, image_size: int = 32, channels: int = 1, test_fraction: float = 0.25,
                seed: int = 0) -> ImageSet:
    """scikit-learn's 8×8 digits (values 0..16, scaled to [0, 1]), bilinearly upsampled to ``image_size``,
    ``channels`` copies; a class-stratified ``test_fraction`` (seeded, fixed by ``seed``) is the test split."""
    from sklearn.datasets import load_digits as _sk_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = _sk_digits()
    images = torch.from_numpy(digits.images).float().div_(16)[:, None]
    labels = torch.from_numpy(digits.target).long()
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    keep = test if split == "test" else ~test
    images = F.interpolate(images[keep], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ImageSet(images.clamp_(0, 1).repeat(1, channels, 1, 1), labels[keep], [str(i) for i in range(10)])


def stratified_subset(labels: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` examples of every class, drawn with ``seed`` (``None``: all indices)."""
    labels = torch.as_tensor(labels)
    if per_class is None:
        return torch.arange(len(labels))
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer or None, got {per_class!r}")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class} but class {c} has only {len(idx)} training examples")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


def normalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """``(images - mean) / std`` per channel with :data:`NORMALIZATION` of ``dataset`` (images in [0, 1])."""
    if dataset not in NORMALIZATION:
        raise ValueError(f"no normalisation for dataset {dataset!r}; known: {sorted(NORMALIZATION)}")
    mean, std = NORMALIZATION[dataset]
    c = images.shape[1]
    mean_t = torch.tensor(mean * (c // len(mean)), dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    std_t = torch.tensor(std * (c // len(std)), dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    return (images - mean_t) / std_t


def augment(images: torch.Tensor, generator: torch.Generator, crop_padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``crop_padding`` and random horizontal flip of a float batch, drawn from
    ``generator`` (so that a resumed run draws the same augmentations)."""
    n, _, h, w = images.shape
    out = images
    if crop_padding > 0:
        padded = F.pad(images, (crop_padding,) * 4)
        dy = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                     rows, cols]
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def load_labels(name: str, split: str, root: str | None = None, **kwargs) -> torch.Tensor:
    """The labels of :func:`load_dataset` (same arguments) in the same order, decoding no image files (MIT Indoor
    and ImageNet labels come from the split lists and folder names)."""
    if name == "mit_indoor" and root is not None:
        images_dir = os.path.join(root, "Images")
        _require_dir(images_dir, "MIT Indoor 67 (Images/<class>/<file>.jpg)")
        classes = sorted(d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d)))
        entries = _read_list(os.path.join(root, "TrainImages.txt" if split == "train" else "TestImages.txt"))
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index.get(e.split("/")[0], -1) for e in entries], dtype=torch.long)
    if name == "imagenet" and root is not None:
        folder = os.path.join(root, "train" if split == "train" else "val")
        _require_dir(folder, f"ImageNet {split} split (<wnid>/<file>.JPEG folders)")
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        files = [sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
                 for c in classes]
        order = imagenet_order(files, kwargs.get("seed", 0))[:kwargs.get("limit")]
        return torch.tensor([c for c, _ in order], dtype=torch.long)
    return load_dataset(name, split, root, **kwargs).labels


def load_dataset(name: str, split: str, root: str | None = None, **kwargs) -> ImageSet:
    """Dispatch: ``cifar10``, ``cifar100``, ``mit_indoor``, ``imagenet`` (need ``root``), ``digits`` (bundled)."""
    if name == "digits":
        return load_digits(split, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, name, split)
    if name == "mit_indoor":
        return load_mit_indoor(root, split, **kwargs)
    if name == "imagenet":
        return load_imagenet(root, split, **kwargs)
    raise ValueError(f"dataset must be one of cifar10, cifar100, mit_indoor, imagenet, digits; got {name!r}")
