"""The main job's task sequences: scikit-learn's 8x8 digits (no download) or MNIST/Fashion-MNIST IDX
files, cut into permuted, split (task-incremental) and class-incremental tasks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch


def load_digits_dataset():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    return x, digits.target.astype(np.int64), "sklearn digits 8x8"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_idx_dataset(data_dir: Path):
    """MNIST or Fashion-MNIST in the standard IDX files (optionally .gz), train and test joined."""

    def find(stem):
        for name in (stem, stem + ".gz"):
            if (data_dir / name).exists():
                return data_dir / name
        raise FileNotFoundError(f"{data_dir}: no {stem}[.gz]")

    parts = []
    for split in ("train", "t10k"):
        images = _read_idx(find(f"{split}-images-idx3-ubyte")).astype(np.float32) / 255.0
        labels = _read_idx(find(f"{split}-labels-idx1-ubyte")).astype(np.int64)
        parts.append((images.reshape(len(images), -1), labels))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return x, y, f"IDX files in {data_dir}"


def make_tasks(x, y, kind: str, n_tasks: int, seed: int, train_fraction=0.7, max_train=None):
    """Lists of task dicts: train/test tensors, the head each task uses and its class count."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    split = int(train_fraction * len(x))
    train, test = (x[:split], y[:split]), (x[split:], y[split:])
    if max_train is not None:
        train = (train[0][:max_train], train[1][:max_train])
    tasks = []
    if kind == "permuted":
        for t in range(n_tasks):
            perm = np.arange(x.shape[1]) if t == 0 else rng.permutation(x.shape[1])
            tasks.append(
                {
                    "name": f"perm{t}",
                    "head": 0,
                    "classes": 10,
                    "train": (torch.tensor(train[0][:, perm]), torch.tensor(train[1])),
                    "test": (torch.tensor(test[0][:, perm]), torch.tensor(test[1])),
                }
            )
    else:
        # split: a 2-way head per task (task identity at test time); class_incremental: the same
        # digit pairs, one shared 10-way head, the digits' own labels, no task identity
        shared = kind == "class_incremental"
        pairs = [(2 * t, 2 * t + 1) for t in range(min(n_tasks, 5))]
        for t, (a, b) in enumerate(pairs):

            def select(part, a=a, b=b):
                mask = (part[1] == a) | (part[1] == b)
                labels = part[1][mask] if shared else (part[1][mask] == b)
                return torch.tensor(part[0][mask]), torch.tensor(labels.astype(np.int64))

            head, classes = (0, 10) if shared else (t, 2)
            tasks.append(
                {
                    "name": f"{a}v{b}",
                    "head": head,
                    "classes": classes,
                    "train": select(train),
                    "test": select(test),
                }
            )
    return tasks
