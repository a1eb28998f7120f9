"""Dataset readers: a data spec in, batches of canonical uint8 pixels with integer labels out.

Data specs (options after `?`, joined by `&`):
  mnist:SPLIT       train | test | big (train digits 0,2,4,6,8) | big-test (test digits 0,2,4,6,8) |
                    small (a seeded sample of `n` train images of 1,3,5,7,9; n=100, seed=0) |
                    small-test (test digits 1,3,5,7,9)
  cifar10:SPLIT     train | test | small (a seeded sample of `per_class` train images per class;
                    per_class=100, seed=0)
  folder:PATH       one subfolder per class holding image files (class index = sorted folder order)
  npz:PATH          arrays `x` (N, H, W[, C]) uint8 (or uint16, scaled to 8 bits) and `y` (N,), optionally
                    `class_names`
Any spec also takes `per_class=N` (and `seed`, default 0): a seeded sample of N images of each class,
and `augment=RECIPE` (with `views=K`, default 1, and `augment_seed=S`, default 0): K augmented views of
every image instead of the image (`extractor.augment`; the test splits refuse it: test images are never
augmented).
`mnist` and `cifar10` read the shared files by default; `source=keras` downloads them through Keras.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import numpy as np

from extractor import paths
from extractor.augment import AugmentRecipe
from extractor.errors import ExtractorError, InvalidInputError, UnknownNameError
from extractor.images import canonical_pixels, pixel_digest, read_image_file
from extractor.labels import class_indices
from extractor.paths import file_identity

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MNIST_FILE = "mnist.npz"
CIFAR10_FILE = "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_CLASSES = 100_000  # labels an npz may use without naming its classes; a larger label is a broken file
EVEN_DIGITS, ODD_DIGITS = (0, 2, 4, 6, 8), (1, 3, 5, 7, 9)
UNLABELLED = "unlabelled"  # the one class of items given without labels

# Every split's options with their defaults; a spec is made canonical by filling them in.
SPLITS = {
    "mnist": {"train": {}, "test": {}, "big": {}, "big-test": {}, "small": {"n": 100, "seed": 0},
              "small-test": {}},
    "cifar10": {"train": {}, "test": {}, "small": {"per_class": 100, "seed": 0}},
}
SOURCES = ("shared", "keras")
SAMPLE_OPTIONS = ("per_class", "seed")  # any spec: a seeded sample of per_class images of each class
AUGMENT_OPTIONS = ("augment", "views", "augment_seed")  # any spec but a test split: augmented views


@dataclass
class ImageBatch:
    """A batch of images: canonical uint8 (H, W, C) arrays, their labels (n,) and where each came from.

    With remembered file digests (see `Dataset.batches`), an image whose file is unchanged since it
    was last read is not decoded: its entry in `images` is None and `load(j)` reads it on demand.
    """

    images: list[np.ndarray | None]
    labels: np.ndarray
    sources: list[str]
    digests: list[bytes] = field(default_factory=list)      # pixel digest of every image
    indices: list[int] = field(default_factory=list)        # dataset item of every image
    file_digests: list[tuple] = field(default_factory=list)  # (path, size, mtime_ns, digest) read now
    load: callable = None

    def pixels(self, j: int) -> np.ndarray:
        image = self.images[j]
        return image if image is not None else self.load(self.indices[j])


@dataclass
class SkippedImage:
    source: str
    reason: str


@dataclass
class Dataset:
    """An ordered list of labelled images, read lazily in batches.

    `load(i)` returns the canonical pixels of item i; it raises `ExtractorError` for an unreadable
    item, which `batches` reports and skips (recorded in `skipped`).
    """

    spec: str
    class_names: list[str]
    labels: np.ndarray
    sources: list[str]
    load: callable
    skipped: list[SkippedImage] = field(default_factory=list)
    files: list[str] | None = None  # the file behind each item, when items are files
    root: str = ""  # the folder or array file the items come from
    relative_sources: list[str] | None = None  # each item's path relative to `root`, or its index in the array

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, i: int) -> str:
        """What a feature set remembers of item i, to join its vector back to its file: the file's path
        relative to `root` (`cat/001.jpg`), or the item's index in the array file (`17`)."""
        return self.relative_sources[i] if self.relative_sources is not None else self.sources[i]

    def batches(self, batch_size: int, limit: int | None = None, threads: int = 2,
                known_digests: Callable[[list[tuple]], dict[str, bytes]] | None = None) -> Iterator[ImageBatch]:
        """Yield batches of up to `batch_size` readable images, from the first `limit` items.

        Items are decoded by `threads` threads. `known_digests` maps file identities (path, size,
        mtime_ns) to remembered pixel digests: such files are not read again.
        """
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be at least 1, got {batch_size}")
        total = len(self) if limit is None else min(limit, len(self))
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
            for start in range(0, total, batch_size):
                indices = range(start, min(start + batch_size, total))
                identities = {i: file_identity(self.files[i]) for i in indices} if self.files else {}
                known = known_digests([x for x in identities.values() if x]) if known_digests and identities else {}
                to_read = [i for i in indices if self.files is None or self.files[i] not in known]
                loaded = dict(zip(to_read, pool.map(self._load_or_error, to_read)))
                batch = ImageBatch([], [], [], load=self.load)
                for i in indices:
                    image = loaded.get(i)
                    if isinstance(image, ExtractorError):
                        log.warning("skipping %s: %s", self.sources[i], image)
                        self.skipped.append(SkippedImage(self.sources[i], str(image)))
                        continue
                    digest = known.get(self.files[i]) if image is None else pixel_digest(image)
                    if image is not None and identities.get(i) and _settled(identities[i]):
                        batch.file_digests.append((*identities[i], digest))
                    batch.images.append(image)
                    batch.labels.append(self.labels[i])
                    batch.sources.append(self.sources[i])
                    batch.digests.append(digest)
                    batch.indices.append(i)
                if batch.images:
                    batch.labels = np.asarray(batch.labels, dtype=np.int64)
                    yield batch

    def _load_or_error(self, i: int) -> np.ndarray | ExtractorError:
        try:
            return self.load(i)
        except ExtractorError as exc:
            return exc

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All readable images as one (n, H, W, C) uint8 array with labels (n,); they must share a size.

        Grayscale images among colour ones (canonical pixels keep an RGB image with three equal channels
        as gray) are repeated to 3 channels, as preprocessing does for a 3-channel model.
        """
        images, labels = [], []
        for batch in self.batches(4096, limit):
            images.extend(batch.images)
            labels.append(batch.labels)
        if len({image.shape[:2] for image in images}) > 1:
            raise InvalidInputError(f"{self.spec}: images of several sizes cannot form one array")
        if len({image.shape[2] for image in images}) > 1:
            images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
        return np.stack(images), np.concatenate(labels)

    def subset(self, indices: np.ndarray, spec: str) -> "Dataset":
        """The items at `indices`, in that order, as a dataset of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        load = self.load
        return Dataset(spec, self.class_names, self.labels[indices], [self.sources[i] for i in indices],
                       lambda i: load(int(indices[i])), files=self.files and [self.files[i] for i in indices],
                       root=self.root, relative_sources=[self.source(i) for i in indices])


def _settled(identity: tuple[str, int, int], seconds: float = 2.0) -> bool:
    """Whether a file was last written long enough ago that a rewrite would change its mtime: a digest
    is remembered only then (as git does against racy writes)."""
    return time.time_ns() - identity[2] > seconds * 1e9


def parse_data_spec(text: str) -> tuple[str, str, dict[str, str]]:
    """Split `kind:target?key=value&...` into its parts."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise InvalidInputError(
            f"data spec {text!r} must look like 'mnist:small', 'cifar10:test', 'folder:PATH' or 'npz:PATH'"
        )
    target, _, query = rest.partition("?")
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise InvalidInputError(f"data spec {text!r}: options must look like key=value&key=value ({exc})") from None
    return kind, target, options


def open_dataset(spec: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Open the dataset a data spec names (see the module docstring); nothing is decoded yet."""
    kind, target, options = parse_data_spec(spec)
    augment = {name: options.pop(name) for name in AUGMENT_OPTIONS if name in options}
    if not augment:
        return _open_sampled(kind, target, options, data_dir)
    if "augment" not in augment:
        raise InvalidInputError("options views and augment_seed need augment=RECIPE (e.g. augment=flip,shift4)")
    if kind in SPLITS and target.endswith("test"):
        raise InvalidInputError(f"{kind}:{target} is a test split: test images are never augmented")
    recipe = AugmentRecipe.parse(augment["augment"])
    views = _int_option({"views": 1, **augment}, "views", 1)
    seed = _int_option({"augment_seed": 0, **augment}, "augment_seed", 0)
    return augmented_views(_open_sampled(kind, target, options, data_dir), recipe, views, seed)


def _open_sampled(kind: str, target: str, options: dict, data_dir) -> Dataset:
    """The dataset of a parsed spec without augmentation, sampled `per_class` if asked."""
    own = SPLITS.get(kind, {}).get(target, {})
    sample = {name: options.pop(name) for name in SAMPLE_OPTIONS if name in options and name not in own}
    if kind in SPLITS:
        dataset = _open_builtin(kind, target, options, paths.data_dir(data_dir))
    elif options:
        raise InvalidInputError(f"{kind} takes only the options {', '.join(SAMPLE_OPTIONS + AUGMENT_OPTIONS)}, "
                                f"got {sorted(options)}")
    elif kind == "folder":
        dataset = open_folder(Path(target))
    elif kind == "npz":
        dataset = open_npz(Path(target))
    else:
        raise UnknownNameError("dataset kind", kind, [*SPLITS, "folder", "npz"])
    if not sample:
        return dataset
    if "per_class" not in sample:
        raise InvalidInputError("option seed needs per_class: it seeds a sample of per_class images of each class")
    per_class, seed = _int_option(sample, "per_class", 1), _int_option({"seed": 0, **sample}, "seed", 0)
    joiner = "&" if "?" in dataset.spec else "?"
    return stratified_sample(dataset, per_class, seed, f"{dataset.spec}{joiner}per_class={per_class}&seed={seed}")


def augmented_spec(spec: str, recipe: str, views: int, seed: int | str) -> str:
    """`spec` asking for `views` views per image by `recipe` (its text) under `seed` (or a `{seed}` placeholder
    of a spec template)."""
    return f"{spec}{'&' if '?' in spec else '?'}augment={recipe}&views={views}&augment_seed={seed}"


def augmented_views(dataset: Dataset, recipe: AugmentRecipe, views: int, seed: int) -> Dataset:
    """`views` augmented views of every item of `dataset` (see `extractor.augment`), item-major: item j is
    view j % views of item j // views, with its label; its source is the original's with `#view<v>`."""
    base_load = dataset.load

    def load(j: int) -> np.ndarray:
        return recipe.view(base_load(j // views), seed, j % views)

    def viewed(sources: list[str]) -> list[str]:
        return [f"{source}#view{v}" for source in sources for v in range(views)]

    return Dataset(augmented_spec(dataset.spec, recipe.text(), views, seed), dataset.class_names,
                   np.repeat(dataset.labels, views), viewed(dataset.sources), load, root=dataset.root, relative_sources=viewed([dataset.source(i) for i in range(len(dataset))]))


def _int_option(options: dict, name: str, minimum: int) -> int:
    try:
        value = int(options[name])
    except ValueError:
        raise InvalidInputError(f"option {name} must be an integer, got {options[name]!r}") from None
    if value < minimum:
        raise InvalidInputError(f"option {name} must be at least {minimum}, got {value}")
    return value


def _open_builtin(kind: str, split: str, options: dict, data_dir: Path) -> Dataset:
    if split not in SPLITS[kind]:
        raise UnknownNameError(f"{kind} split", split, SPLITS[kind])
    source = options.pop("source", "shared")
    if source not in SOURCES:
        raise UnknownNameError("data source", source, SOURCES)
    defaults = SPLITS[kind][split]
    unknown = set(options) - set(defaults)
    if unknown:
        raise InvalidInputError(f"{kind}:{split} takes options {sorted(defaults) or 'none'}, got {sorted(unknown)}")
    params = {name: _int_option({**defaults, **options}, name, 1 if name != "seed" else 0) for name in defaults}
    query = {**params, **({"source": source} if source != "shared" else {})}
    spec = f"{kind}:{split}" + (f"?{urlencode(query)}" if query else "")
    opener = _open_mnist if kind == "mnist" else _open_cifar10
    return opener(split, params, source, data_dir, spec)


def _open_mnist(split: str, params: dict, source: str, data_dir: Path, spec: str) -> Dataset:
    if source == "keras":
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        origin = "keras:mnist"
    else:
        path = paths.verified_file(data_dir / MNIST_FILE, paths.published_sha256(MNIST_FILE, data_dir))
        x_train, y_train, x_test, y_test = _mnist_arrays(str(path), path.stat().st_mtime)
        origin = str(path)
    x, y, part = (x_test, y_test, "test") if split.endswith("test") else (x_train, y_train, "train")
    digits = {"big": EVEN_DIGITS, "big-test": EVEN_DIGITS, "small": ODD_DIGITS,
              "small-test": ODD_DIGITS}.get(split, tuple(range(10)))
    indices = np.flatnonzero(np.isin(y, digits))
    if split == "small":
        indices = _seeded_sample(indices, params["n"], params["seed"])
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[list(digits)] = np.arange(len(digits))
    return _array_dataset(spec, x, relabel[y], indices, [str(d) for d in digits], f"{origin}:{part}")


@functools.lru_cache(maxsize=2)
def _mnist_arrays(path: str, mtime: float) -> tuple[np.ndarray, ...]:
    """The four MNIST arrays, read once per process (the file is 11 MB compressed)."""
    with np.load(path) as arrays:
        return tuple(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))


def _open_cifar10(split: str, params: dict, source: str, data_dir: Path, spec: str) -> Dataset:
    part = "test" if split == "test" else "train"
    if source == "keras":
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        x, y = (x_test, y_test) if part == "test" else (x_train, y_train)
        full = _array_dataset(spec, x, y.reshape(-1).astype(np.int64), np.arange(len(y)),
                              CIFAR10_CLASSES, f"keras:cifar10:{part}")
    else:
        root = extract_cifar10(data_dir)
        full = dataclasses.replace(_listed_folder(root / part), skipped=[])
        if full.class_names != CIFAR10_CLASSES:
            raise InvalidInputError(f"{root / part} holds classes {full.class_names}, expected {CIFAR10_CLASSES}")
    if split != "small":
        full.spec = spec
        return full
    return stratified_sample(full, params["per_class"], params["seed"], spec)


def stratified_sample(dataset: Dataset, per_class: int, seed: int, spec: str) -> Dataset:
    """A seeded sample of `per_class` items of every class, in the dataset's order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(dataset.class_names)):
        members = np.flatnonzero(dataset.labels == label)
        if per_class > len(members):
            raise InvalidInputError(f"cannot sample {per_class} images of class {dataset.class_names[label]!r} "
                                    f"from {len(members)}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return dataset.subset(np.sort(np.concatenate(chosen)), spec)


def _seeded_sample(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n > len(indices):
        raise InvalidInputError(f"cannot sample {n} images from {len(indices)}")
    return np.sort(np.random.default_rng(seed).choice(indices, n, replace=False))


def _array_dataset(spec, x, y, indices, class_names, origin) -> Dataset:
    """Items `indices` of the images `x` (an array, or a list of arrays) with labels `y` (indexed likewise)."""
    indices = np.asarray(indices, dtype=np.int64)
    return Dataset(spec, list(class_names), np.asarray(y)[indices].astype(np.int64),
                   [f"{origin}[{i}]" for i in indices], lambda i: canonical_pixels(x[indices[i]]), root=origin,
                   relative_sources=[str(i) for i in indices])


def encode_labels(labels, n: int, class_names=None) -> tuple[np.ndarray, list[str]]:
    """(y (n,) int64 class indices, class names) for `labels`: None (every item in one class, `unlabelled`),
    n integer class indices (named by `class_names`, else "0", "1", ...), or n names (classes in sorted
    order, or in the order of `class_names`)."""
    if labels is None:
        return np.zeros(n, np.int64), list(class_names) if class_names is not None else [UNLABELLED]
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise InvalidInputError(f"got {len(labels)} labels for {n} items")
    if labels.dtype.kind in "iu":
        classes = int(labels.max()) + 1 if n else 0
        names = list(class_names) if class_names is not None else [str(c) for c in range(classes)]
        if n and (labels.min() < 0 or classes > len(names)):
            raise InvalidInputError(f"integer labels must lie in 0..{len(names) - 1} (one per class name), "
                                    f"got {labels.min()}..{labels.max()}")
        return labels.astype(np.int64), [str(name) for name in names]
    if labels.dtype.kind not in "UO":
        raise InvalidInputError(f"labels must be integers or class names, got {labels.dtype}")
    names, indices = class_indices(labels.astype(str), None if class_names is None else
                                   [str(name) for name in class_names])
    return indices, [str(name) for name in names]


def array_dataset(images, labels=None, class_names=None) -> Dataset:
    """Images in memory, a (n, H, W[, C]) uint8 array or a list of (H, W[, C]) uint8 arrays, as a dataset
    (labels as `encode_labels` takes them); each item's source is its index."""
    y, names = encode_labels(labels, len(images), class_names)
    return _array_dataset(f"arrays:{len(images)}", images, y, np.arange(len(images)), names, "arrays")


def file_dataset(files, labels=None, class_names=None) -> Dataset:
    """Image files (paths, in order) as a dataset (labels as `encode_labels` takes them); each item's
    source is its path as given."""
    files = [str(f) for f in files]
    y, names = encode_labels(labels, len(files), class_names)
    return Dataset(f"files:{len(files)}", names, y, files, lambda i: read_image_file(files[i]), files=files,
                   relative_sources=files)


def open_npz(path: Path) -> Dataset:
    """Arrays `x` (N, H, W[, C]) uint8 or uint16 and `y` (N,) integer labels, optionally `class_names`."""
    if not path.is_file():
        raise InvalidInputError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            names = arrays["class_names"] if "class_names" in arrays else None
    except KeyError as exc:
        raise InvalidInputError(f"{path} must hold arrays 'x' and 'y': {exc}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"cannot read {path} as npz: {exc or 'empty file'}") from None
    except MemoryError as exc:  # numpy allocates what an array's header declares before reading its data
        raise InvalidInputError(f"cannot read {path} as npz: an array declares more than memory holds ({exc})") from None
    if x.dtype not in (np.uint8, np.uint16) or x.ndim not in (3, 4):
        raise InvalidInputError(f"{path}: x must be uint8 or uint16 (N, H, W[, C]), got {x.dtype} {x.shape}")
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise InvalidInputError(f"{path}: y must be {len(x)} non-negative integers, got {y.dtype} {y.shape}")
    classes = int(y.max()) + 1 if len(y) else 0
    if names is None:
        if classes > MAX_CLASSES:
            raise InvalidInputError(f"{path}: label {classes - 1} without class_names (labels must be under "
                                    f"{MAX_CLASSES})")
        names = [str(c) for c in range(classes)]
    elif names.ndim != 1 or len(names) < classes:
        raise InvalidInputError(f"{path}: class_names must list at least {classes} names, got shape {names.shape}")
    else:
        names = [str(n) for n in names]
    return _array_dataset(f"npz:{path.resolve()}", x, y, np.arange(len(y)), names, str(path.resolve()))


@functools.lru_cache(maxsize=4)
def _listed_folder(root: Path) -> Dataset:
    """A folder that does not change (the extracted archive), listed once per process."""
    return open_folder(root)


def open_folder(root: Path) -> Dataset:
    """Image files in one subfolder per class; classes in sorted folder order, files in sorted order."""
    if not root.is_dir():
        raise InvalidInputError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise InvalidInputError(f"{root} has no class subfolders (expected {root}/CLASS/IMAGE.jpg)")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                files.append(str(path))
                labels.append(label)
    return Dataset(f"folder:{root.resolve()}", [d.name for d in class_dirs], np.asarray(labels, dtype=np.int64),
                   files, lambda i: read_image_file(files[i]), files=files, root=str(root.resolve()),
                   relative_sources=[Path(f).relative_to(root).as_posix() for f in files])


def extract_cifar10(data_dir: Path) -> Path:
    """Extract the shared CIFAR-10 JPEG archive once into the cache; return its `cifar10-jpeg` folder.

    The archive is verified first; extraction goes to a temporary folder renamed into place, so an
    interrupted extraction never leaves a half-filled folder behind.
    """
    archive = data_dir / CIFAR10_FILE
    sha256 = paths.published_sha256(CIFAR10_FILE, data_dir)
    target = paths.cache_dir() / f"cifar10-jpeg-{(sha256 or 'unverified')[:16]}"
    if (target / "cifar10-jpeg").is_dir():
        return target / "cifar10-jpeg"
    paths.verified_file(archive, sha256)
    log.info("extracting %s into %s (once)", archive, target)
    staging = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        if not (staging / "cifar10-jpeg").is_dir():
            raise InvalidInputError(f"{archive} has no top-level cifar10-jpeg folder")
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "cifar10-jpeg").is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "cifar10-jpeg"
