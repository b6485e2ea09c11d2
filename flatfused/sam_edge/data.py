"""Data for the SAM-edge experiments, none of it downloaded.

Images: MNIST or CIFAR-10 read from a local directory in torchvision's layouts (the files
torchvision's ``MNIST(root)``/``CIFAR10(root)`` keep; read here without torchvision), or
*synthetic digits*: MNIST-shaped 28x28 images of the digits 0-9 drawn from pen strokes with a
random affine distortion, generated from a fixed seed (the default: it needs no files at all).
Text for the transformer: any ASCII file, or by default the reference documentation that ships
with CPython (``pydoc_data.topics``).

Errors are :class:`DataError`, whose message the command prints as its one-line refusal.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

NUM_CLASSES = 10
SYNTHETIC_TRAIN_SIZE = 10000  # the generated set's sizes when no reduced set is asked for
SYNTHETIC_TEST_SIZE = 2000
SYNTHETIC_SEED = 20230123  # fixed: the data are the same whatever the run's --seed
VOCAB_SIZE = 128  # ASCII code points, as the original's character-level model
PAD_TOKEN = 0  # reserved by the original (its loss masks it); a corpus may not contain NUL


class DataError(ValueError):
    """The data asked for cannot be had; the message says why and what to pass instead."""


@dataclass
class ImageData:
    name: str  # what the output calls the data
    source: str  # where it came from
    train_x: torch.Tensor  # uint8, (N, C, H, W)
    train_y: torch.Tensor  # int64, (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor

    def describe(self) -> str:
        c, h, w = self.train_x.shape[1:]
        return (f"{self.name} ({self.source}): {len(self.train_y)} training and "
                f"{len(self.test_y)} test images, {h}x{w}x{c}, {NUM_CLASSES} classes")


# ------------------------------------------------------------------------ synthetic digits

def _arc(cx, cy, rx, ry, start, stop, n):
    """Points of an elliptic arc in the unit box (y grows downwards), angles in degrees."""
    out = []
    for i in range(n + 1):
        a = math.radians(start + (stop - start) * i / n)
        out.append((cx + rx * math.cos(a), cy - ry * math.sin(a)))
    return out


# Each digit is a few polylines in the unit box, a plain pen-drawn shape of the character.
_STROKES = {
    0: [_arc(0.5, 0.5, 0.3, 0.45, 90, 450, 20)],
    1: [[(0.36, 0.2), (0.54, 0.05), (0.54, 0.95)]],
    2: [_arc(0.5, 0.3, 0.28, 0.25, 160, -40, 8) + [(0.2, 0.95), (0.82, 0.95)]],
    3: [_arc(0.5, 0.28, 0.26, 0.23, 150, -90, 8), _arc(0.5, 0.73, 0.29, 0.23, 90, -150, 8)],
    4: [[(0.66, 0.95), (0.66, 0.05), (0.15, 0.68), (0.85, 0.68)]],
    5: [[(0.8, 0.05), (0.3, 0.05)] + _arc(0.5, 0.68, 0.3, 0.27, 140, -150, 10)],
    6: [[(0.72, 0.06), (0.45, 0.25), (0.24, 0.62)], _arc(0.5, 0.7, 0.27, 0.25, 0, 360, 16)],
    7: [[(0.15, 0.06), (0.85, 0.06), (0.42, 0.95)]],
    8: [_arc(0.5, 0.28, 0.22, 0.22, 0, 360, 14), _arc(0.5, 0.72, 0.27, 0.24, 0, 360, 16)],
    9: [_arc(0.5, 0.3, 0.27, 0.25, 0, 360, 16), [(0.77, 0.3), (0.7, 0.95)]],
}


def _shape(digit: int):
    """The digit's vertices (V, 2) and its segments as vertex-index pairs (S, 2)."""
    vertices, segments = [], []
    for line in _STROKES[digit]:
        first = len(vertices)
        vertices += line
        segments += [(first + i, first + i + 1) for i in range(len(line) - 1)]
    return torch.tensor(vertices, dtype=torch.float64), torch.tensor(segments)


def _draw(digit: int, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distorted images of ``digit``: vertices jittered, then a random rotation, shear,
    scale and shift of the whole shape, then a pen of random width (anti-aliased)."""
    vertices, segments = _shape(digit)
    f64 = dict(dtype=torch.float64, generator=gen)  # the shapes in float64, the pixels in float32
    pts = vertices + 0.02 * torch.randn(n, *vertices.shape, **f64) - 0.5  # (n, V, 2)
    angle = math.radians(10) * (2 * torch.rand(n, **f64) - 1)
    shear = 0.15 * (2 * torch.rand(n, **f64) - 1)
    scale = 0.8 + 0.2 * torch.rand(n, 2, **f64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # rotation
    m = m @ torch.stack([torch.stack([torch.ones_like(shear), shear], -1),
                         torch.stack([torch.zeros_like(shear), torch.ones_like(shear)], -1)], -2)
    m = m * scale[:, None, :]
    shift = 0.06 * (2 * torch.rand(n, 1, 2, **f64) - 1)
    pts = pts @ m.transpose(1, 2) + 0.5 + shift
    # The unit box fills the central 20x20 of a 28x28 image, as MNIST's digits do.
    margin = 4 / 28
    pts = margin + pts * (1 - 2 * margin)
    pts = pts.float()
    a, b = pts[:, segments[:, 0]], pts[:, segments[:, 1]]  # (n, S, 2)
    centers = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grid = torch.stack(torch.meshgrid(centers, centers, indexing="xy"), -1).reshape(-1, 2)
    gx, gy = grid[:, 0], grid[:, 1]
    dist2 = None  # squared distance of each pixel to the nearest segment, (n, P)
    for s in range(len(segments)):
        ax_, ay_ = a[:, s, :1], a[:, s, 1:]
        dx, dy = b[:, s, :1] - ax_, b[:, s, 1:] - ay_
        px, py = gx - ax_, gy - ay_
        t = ((px * dx + py * dy) / (dx * dx + dy * dy).clamp_min(1e-12)).clamp_(0, 1)
        d2 = (px - t * dx).square_() + (py - t * dy).square_()
        dist2 = d2 if dist2 is None else torch.minimum(dist2, d2, out=dist2)
    dist = dist2.sqrt_()
    width = (0.035 + 0.02 * torch.rand(n, 1, **f64)).float()
    ink = ((width - dist) * size + 0.5).clamp(0, 1)  # one pixel of anti-aliasing
    return (ink * 255).round().to(torch.uint8).reshape(n, 1, size, size)


def synthetic_digits(n: int, split: str, size: int = 28) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated digit images (uint8, (n, 1, size, size)) and labels, the same for the same
    ``split`` ("train"/"test") on every call. They are made in chunks of 1000, each from its own
    seed, so the first ``m`` examples do not depend on ``n``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small element-wise ops: more threads only add synchronisation
    try:
        return _synthetic_digits(n, split, size)
    finally:
        torch.set_num_threads(threads)


def _synthetic_digits(n: int, split: str, size: int):
    chunk = 1000
    images, labels = [], []
    for start in range(0, n, chunk):
        # A whole chunk is drawn even when fewer are kept, so that its draws do not depend on n.
        gen = torch.Generator().manual_seed(SYNTHETIC_SEED + (0 if split == "train" else 10 ** 6)
                                            + start)
        y = torch.randperm(chunk, generator=gen) % NUM_CLASSES
        x = torch.empty(chunk, 1, size, size, dtype=torch.uint8)
        for digit in range(NUM_CLASSES):
            where = (y == digit).nonzero().flatten()
            for i in range(0, len(where), 128):  # bounded memory: (128, size^2, segments, 2)
                part = where[i:i + 128]
                x[part] = _draw(digit, len(part), size, gen)
        images.append(x)
        labels.append(y)
    return torch.cat(images)[:n], torch.cat(labels)[:n].long()


# ------------------------------------------------------------------------------ local files

def _find(directory: str, subdirs: Sequence[str], names: Sequence[str], what: str) -> str:
    """The first of ``directory``/``subdirs`` holding every file of ``names``."""
    if not os.path.isdir(directory):
        raise DataError(f"--data_dir {directory!r} is not a directory")
    tried = []
    for sub in subdirs:
        folder = os.path.join(directory, sub) if sub else directory
        tried.append(folder)
        if all(any(os.path.exists(os.path.join(folder, n + gz)) for gz in ("", ".gz"))
               for n in names):
            return folder
    raise DataError(f"no {what} under --data_dir {directory!r}: looked for {', '.join(names)} "
                    f"(or .gz) in {', '.join(tried)}; nothing is downloaded")


def _read_idx(path: str, magic: int, what: str) -> torch.Tensor:
    """An IDX file (MNIST's format) of unsigned bytes, optionally gzipped."""
    if not os.path.exists(path):
        path += ".gz"
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file of {what} (magic number "
                        f"{int.from_bytes(data[:4], 'big'):#x}, expected {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + math.prod(dims):
        raise DataError(f"{path} holds {len(data) - header} bytes of {what}, its header says "
                        f"{math.prod(dims)}: the file is truncated or corrupt")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


def _mnist(directory: str):
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    folder = _find(directory, ["MNIST/raw", "raw", "", "MNIST"], sum(files.values(), ()),
                   "MNIST files")
    out = []
    for split in ("train", "test"):
        images = _read_idx(os.path.join(folder, files[split][0]), 0x803, "images")
        labels = _read_idx(os.path.join(folder, files[split][1]), 0x801, "labels")
        if len(images) != len(labels) or images.dim() != 3:
            raise DataError(f"MNIST {split} files in {folder} disagree: {tuple(images.shape)} "
                            f"images, {len(labels)} labels")
        out += [images[:, None].clone(), labels.long()]
    return folder, out


def _cifar10(directory: str):
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    folder = _find(directory, ["cifar-10-batches-py", ""], train_names + ["test_batch"],
                   "CIFAR-10 python batches")
    out = []
    for names in (train_names, ["test_batch"]):
        images, labels = [], []
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    # The python version of CIFAR-10 is pickled (as torchvision also reads it):
                    # point --data_dir only at files you trust.
                    batch = pickle.load(f, encoding="bytes")
                x = torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
                y = torch.as_tensor(batch[b"labels"], dtype=torch.long)
            except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
                    EOFError) as exc:
                raise DataError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
            images.append(x)
            labels.append(y)
        out += [torch.cat(images), torch.cat(labels)]
    return folder, out


def load_images(dataset: str, data_dir: Optional[str], train_size: Optional[int],
                test_size: Optional[int]) -> ImageData:
    """The training and test images. ``train_size``/``test_size``: the reduced sets' sizes (the
    first examples, as the original's ``take``), None for the whole sets."""
    if dataset == "synthetic_digits":
        n_train = train_size or SYNTHETIC_TRAIN_SIZE
        n_test = test_size or SYNTHETIC_TEST_SIZE
        train_x, train_y = synthetic_digits(n_train, "train")
        test_x, test_y = synthetic_digits(n_test, "test")
        return ImageData("synthetic digits", "generated here, no download: pen-stroke digits "
                         "0-9 with random affine distortions, fixed seed", train_x, train_y,
                         test_x, test_y)
    reader, name = {"mnist": (_mnist, "MNIST"), "cifar10": (_cifar10, "CIFAR-10")}[dataset]
    folder, (train_x, train_y, test_x, test_y) = reader(data_dir)
    for size, total, flag in ((train_size, len(train_y), "--mini_training_set_num_batches"),
                              (test_size, len(test_y), "--mini_test_set_num_batches")):
        if size is not None and size > total:
            raise DataError(f"{flag} asks for {size} examples, {name} in {folder} has {total}")
    if train_size is not None:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    if test_size is not None:
        test_x, test_y = test_x[:test_size], test_y[:test_size]
    return ImageData(name, f"read from {folder}", train_x, train_y, test_x, test_y)


# ------------------------------------------------------------------------------------ text

def default_text() -> Tuple[str, str, str]:
    """(training text, test text, description): CPython's own reference documentation, the
    topics ``help()`` shows, which every CPython ships; its few non-ASCII characters dropped.
    The first 90% (at a line break) is for training, the rest for testing."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python lacks pydoc_data (the default text): pass --training_data "
                        "and --test_data") from None
    text = "\n\n".join(topics[k] for k in sorted(topics))
    text = "".join(c for c in text if c.isascii() and c != chr(PAD_TOKEN))
    cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
    return text[:cut], text[cut:], ("CPython's reference documentation (pydoc_data.topics, "
                                    "shipped with Python; non-ASCII characters dropped), the "
                                    "first 90% for training and the rest for testing")


def read_text(path: str, flag: str) -> str:
    """A corpus file: ASCII without NUL, as the original's character-level data requires."""
    try:
        with open(path, encoding="ascii", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{flag} {path!r}: not ASCII (byte {exc.object[exc.start]:#x} at offset "
                        f"{exc.start}); the model's vocabulary is the 128 ASCII code points"
                        ) from None
    except OSError as exc:
        raise DataError(f"{flag} {path!r}: {exc.strerror or exc}") from None
    if chr(PAD_TOKEN) in text:
        raise DataError(f"{flag} {path!r} contains a NUL character, the padding token")
    return text


def chunks(text: str, sequence_length: int) -> torch.Tensor:
    """The corpus as consecutive, non-overlapping pieces of ``sequence_length + 1`` codes
    (inputs and their next-character targets); the incomplete last piece is dropped."""
    codes = torch.tensor(list(text.encode("ascii")), dtype=torch.long)
    n = len(codes) // (sequence_length + 1)
    return codes[:n * (sequence_length + 1)].reshape(n, sequence_length + 1)


def text_batches(pieces: torch.Tensor, batch_size: int, gen: torch.Generator
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches: the pieces in a new random order each pass (from
    ``gen``), ``batch_size`` at a time, the incomplete last batch of a pass dropped."""
    while True:
        order = torch.randperm(len(pieces), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = pieces[order[i:i + batch_size]]
            yield batch[:, :-1], batch[:, 1:]


def fixed_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> List[Tuple[torch.Tensor,
                                                                                  torch.Tensor]]:
    """Consecutive batches of ``batch_size``, the incomplete last one dropped (the original's
    ``batch(drop_remainder=True)``)."""
    return [(x[i:i + batch_size], y[i:i + batch_size])
            for i in range(0, len(y) - batch_size + 1, batch_size)]
