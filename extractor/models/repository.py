"""The model repository: one folder per model with its `config.toml`; the user's repository, then the shipped one."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path

from extractor import paths
from extractor.errors import InvalidInputError, UnknownNameError
from extractor.models.config import ModelConfig, read_config, write_config
from extractor.models.preprocessing import Preprocessing
from extractor.models.spec import BackboneSpec

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "shipped"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SUFFIX_RUNTIMES = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".tflite": "tflite", ".onnx": "onnx"}


def runtime_for(path: Path) -> str:
    """The runtime a model file's name implies (a folder with saved_model.pb is a SavedModel)."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise InvalidInputError(f"{path} is a folder without saved_model.pb; give --format")
    if path.suffix.lower() not in _SUFFIX_RUNTIMES:
        raise InvalidInputError(f"cannot tell the format of {path.name} from its name; give --format "
                                "keras, savedmodel, tflite or onnx")
    return _SUFFIX_RUNTIMES[path.suffix.lower()]


class ModelRepository:
    """The user's repository (`folder`, default in the cache) searched first, then the shipped one.

    A name is one entry: the same name in both, or twice, is an error naming both folders.
    """

    def __init__(self, folder: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None):
        self.folder = paths.model_repository(folder)
        self.data_dir = data_dir
        self.folders = [self.folder] if self.folder.resolve() == SHIPPED else [self.folder, SHIPPED]

    def entries(self) -> dict[str, Path]:
        """name -> entry folder, over every repository folder."""
        found: dict[str, Path] = {}
        for root in self.folders:
            if not root.is_dir():
                continue
            for entry in sorted(root.iterdir()):
                if not entry.is_dir() or entry.name.startswith((".", "_")):
                    continue
                if entry.name in found:
                    raise InvalidInputError(f"two models named {entry.name!r}: {found[entry.name]} and {entry}; "
                                            "remove or rename one")
                found[entry.name] = entry
        return found

    def names(self) -> list[str]:
        return sorted(self.entries())

    def config(self, name: str) -> ModelConfig:
        entries = self.entries()
        if name not in entries:
            raise UnknownNameError("model", name, entries)
        return read_config(entries[name])

    def spec(self, name: str, *, input_size: int | None = None, recipe: str | Preprocessing | None = None,
             pooling: str | None = None) -> BackboneSpec:
        """The entry `name`, its file and sha256 resolved, with these options (checked)."""
        config = self.config(name)
        path = resolve_file(config, self.data_dir)
        sha256 = config.sha256 or (_listed_sha256(Path(path)) if path != "imagenet" else None)
        spec = BackboneSpec(config=config, path=path, sha256=sha256, input_size=config.input_size,
                            preprocessing=config.preprocessing, pooling=config.pooling)
        return spec.configure(input_size=input_size, recipe=recipe, pooling=pooling)

    def remove(self, name: str) -> Path:
        entries = self.entries()
        if name not in entries:
            raise UnknownNameError("model", name, entries)
        if entries[name].parent == SHIPPED and self.folder.resolve() != SHIPPED:
            raise InvalidInputError(f"{name} is shipped with the project and cannot be removed")
        shutil.rmtree(entries[name])
        return entries[name]

    def add(self, name: str, source: str | os.PathLike, *, runtime: str | None = None, cut: str | None = None,
            input_size: int | None = None, preprocessing: Preprocessing | None = None, pooling: str | None = None,
            architecture: str | None = None, signature: str | None = None, summary: str = "",
            copy: bool = True) -> BackboneSpec:
        """Write a new entry after loading the model once through the same code that will serve it.

        The file is copied into the entry's folder (or, with `copy=False`, referred to where it is: as
        `{data}/...` when it lies in the shared data folder). Nothing is left behind when a check fails.
        """
        from extractor.models.runtimes import check_cut, inspect_model

        if not _NAME.match(name):
            raise InvalidInputError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (64 at most), "
                                    "starting with a letter or digit")
        existing = self.entries()
        if name in existing:
            raise InvalidInputError(f"a model named {name!r} exists already ({existing[name]}); "
                                    "remove it first or choose another name")
        source = Path(source).expanduser().resolve()
        if not source.exists():
            raise InvalidInputError(f"file not found: {source}")
        runtime = runtime or runtime_for(source)
        info = inspect_model(runtime, str(source), architecture=architecture, signature=signature,
                             input_size=input_size)
        cut = cut or info.default_cut
        check_cut(cut, info.names, name)
        height, width, channels = info.input_shape
        if height != width and None not in (height, width):
            raise InvalidInputError(f"{name}: the model takes {height}x{width} images; only square inputs are "
                                    "supported")
        resizable = bool(architecture) or height is None
        size = input_size or height
        if size is None:
            raise InvalidInputError(f"{name}: the model takes any input size; give --input-size")
        if not resizable and input_size and input_size != height:
            raise InvalidInputError(f"{name}: the model takes only input size {height}, got {input_size}")
        if preprocessing is None:
            from extractor.models.preprocessing import preset

            preprocessing = preset("uint8" if info.input_dtype == "uint8" else "unit")
            log.warning("%s: no preprocessing given; using preset %r (pixels%s)", name, preprocessing.name,
                        " as they are" if preprocessing.dtype == "uint8" else " / 255")
        folder = self.folder / name
        staging = self.folder / f".{name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if copy:
                stored = staging / source.name
                _copy(source, stored)
                file_field = source.name
            else:
                file_field = _referenced(source, self.data_dir)
            config = ModelConfig(
                name=name, folder=str(folder), runtime=runtime, file=file_field, input_size=size,
                preprocessing=preprocessing, summary=summary or f"{source.name}, cut at {cut}",
                sha256=paths.content_sha256(stored if copy else source), architecture=architecture,
                signature=signature, cut=cut, pooling=pooling or "none", layout=info.layout,
                channels=channels or 3, resizable=resizable)
            built = _build_with_pooling(BackboneSpec(
                config=dataclasses.replace(config, folder=str(staging)), path=str(stored if copy else source),
                sha256=config.sha256, input_size=size, preprocessing=preprocessing, pooling=config.pooling),
                asked=pooling)
            config = dataclasses.replace(config, pooling=built.spec.pooling, output_dim=built.output_dim)
            write_config(config, staging)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("added %s: %s, cut %s, %d-d, in %s", name, runtime, cut, config.output_dim, folder)
        return self.spec(name)


def _build_with_pooling(spec: BackboneSpec, asked: str | None):
    """Build `spec` with the pooling asked for, or, when none was: none for an (n, d) cut, else avg."""
    from extractor.models.backbone import FrozenBackbone
    from extractor.models.runtimes import CutShapeError

    if asked:
        return FrozenBackbone(dataclasses.replace(spec, pooling=asked))
    try:
        return FrozenBackbone(dataclasses.replace(spec, pooling="none"))
    except CutShapeError:
        return FrozenBackbone(dataclasses.replace(spec, pooling="avg"))


def resolve_file(config: ModelConfig, data_dir: str | os.PathLike | None = None) -> str:
    """The entry's file as an absolute path: `{data}/` and `{cache}/` expanded, others relative to its folder."""
    file = config.file
    if config.architecture and file == "imagenet":
        return file
    if file.startswith("{data}/"):
        return str((paths.data_dir(data_dir) / file[len("{data}/"):]).absolute())
    if file.startswith("{cache}/"):
        return str((paths.cache_dir() / file[len("{cache}/"):]).absolute())
    return str((Path(config.folder) / Path(file).expanduser()).absolute())


def _referenced(source: Path, data_dir: str | os.PathLike | None) -> str:
    """How a config refers to a file it does not copy: `{data}/...` inside the shared data folder."""
    data = paths.data_dir(data_dir).resolve()
    if source.is_relative_to(data):
        return "{data}/" + source.relative_to(data).as_posix()
    return str(source)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
        return
    try:
        os.link(source, target)  # same file system: no second copy of the bytes
    except OSError:
        shutil.copy2(source, target)


def _listed_sha256(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text().split()[0].lower()
    return paths.published_sha256(path.name, path.parent)


def get_backbone_spec(name: str, *, input_size: int | None = None, recipe: str | Preprocessing | None = None,
                      pooling: str | None = None, repository: str | os.PathLike | None = None,
                      data_dir: str | os.PathLike | None = None) -> BackboneSpec:
    """The entry `name` of the user's repository (or the shipped one), configured with these options."""
    return ModelRepository(repository, data_dir).spec(name, input_size=input_size, recipe=recipe, pooling=pooling)


def backbone_names(repository: str | os.PathLike | None = None) -> list[str]:
    return ModelRepository(repository).names()
