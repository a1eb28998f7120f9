"""A model repository entry's `config.toml`: parsed, validated (unknown keys and wrong types refused), written."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from extractor.errors import InvalidInputError, UnknownNameError
from extractor.models.preprocessing import Preprocessing, preset

CONFIG_FILE = "config.toml"
RUNTIMES = ("keras", "savedmodel", "tflite", "onnx")
POOLINGS = ("none", "flatten", "avg", "max")
LAYOUTS = ("nhwc", "nchw")

# key -> accepted Python types, per table; the only keys a config may hold
_TOP = {"summary": str, "version": int, "runtime": str, "file": str, "sha256": str, "architecture": str,
        "signature": str, "cut": str, "pooling": str, "output_dim": int, "missing": str, "layout": str}
_INPUT = {"size": int, "channels": int, "resizable": bool, "min_size": int}
_PREPROCESSING = {"preset": str, "pad_to": int, "channel_order": str, "mean": (list, float, int),
                  "std": (list, float, int), "dtype": str}
_MEASURED = {"source": str, "source_fingerprint": str, "images_per_second": float,
             "source_images_per_second": float, "speedup": float, "max_abs_deviation": float,
             "min_cosine": float, "quantization": str, "sample": str, "sample_images": int}
_TABLES = {"input": _INPUT, "preprocessing": _PREPROCESSING, "measured": _MEASURED}


@dataclass(frozen=True)
class ModelConfig:
    """One entry of a model repository, as its config declares it (paths not yet resolved).

    file: the model file (or SavedModel folder), relative to the entry's folder, or starting with
          `{data}/` (the shared data directory) or `{cache}/` (the cache directory); for a
          keras.applications `architecture`, its weights file, or `imagenet` for Keras' own download.
    sha256: the file's sha256, checked before loading; when absent, the one listed in SHA256SUMS
            beside the file or in a `<file>.sha256` sidecar.
    cut: a layer (Keras), tensor (TFLite), output key (SavedModel) or node output (ONNX); None: the
         model's first output.
    output_dim: the vector width at the declared input size and pooling (measured by `models add`).
    missing: what to tell a user whose file is not there yet (how to make it).
    measured: figures recorded by `models optimize` (speed-up and deviation against the source entry).
    """

    name: str
    folder: str
    runtime: str
    file: str
    input_size: int
    preprocessing: Preprocessing
    summary: str = ""
    version: int = 1
    sha256: str | None = None
    architecture: str | None = None
    signature: str | None = None
    cut: str | None = None
    pooling: str = "none"
    output_dim: int | None = None
    missing: str | None = None
    layout: str = "nhwc"
    channels: int = 3
    resizable: bool = False
    min_input_size: int = 1
    measured: dict | None = None

    def to_toml(self) -> dict:
        """The config as the TOML document `write_config` writes (defaults left out)."""
        top = {"summary": self.summary, "version": self.version, "runtime": self.runtime, "file": self.file,
               "sha256": self.sha256, "architecture": self.architecture, "signature": self.signature,
               "cut": self.cut, "pooling": self.pooling, "output_dim": self.output_dim,
               "missing": self.missing, "layout": self.layout if self.layout != "nhwc" else None}
        document = {k: v for k, v in top.items() if v not in (None, "")}
        document["input"] = {"size": self.input_size, "channels": self.channels, "resizable": self.resizable}
        if self.resizable and self.min_input_size > 1:
            document["input"]["min_size"] = self.min_input_size
        document["preprocessing"] = _preprocessing_toml(self.preprocessing)
        if self.measured:
            document["measured"] = dict(self.measured)
        return document


def _preprocessing_toml(p: Preprocessing) -> dict:
    if p.name != "custom" and dataclasses.replace(preset(p.name)) == p:
        return {"preset": p.name}
    out = {"channel_order": p.channel_order, "dtype": p.dtype, "mean": list(p.mean), "std": list(p.std)}
    if p.pad_to:
        out["pad_to"] = p.pad_to
    return out


def read_config(folder: str | Path) -> ModelConfig:
    """Parse and validate `folder/config.toml`; every error names the file and the key."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidInputError(f"{folder}: no {CONFIG_FILE} (a model repository entry needs one)")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path}: not valid TOML: {e}") from e
    return parse_config(document, name=folder.name, folder=str(folder.resolve()), source=str(path))


def parse_config(document: dict, *, name: str, folder: str, source: str) -> ModelConfig:
    _check_table(document, _TOP, source, "", tables=_TABLES)
    for table, schema in _TABLES.items():
        if table in document:
            if not isinstance(document[table], dict):
                raise InvalidInputError(f"{source}: [{table}] must be a table")
            _check_table(document[table], schema, source, table)
    for key in ("runtime", "file"):
        if key not in document:
            raise InvalidInputError(f"{source}: missing key {key!r}")
    inputs = document.get("input", {})
    if "size" not in inputs:
        raise InvalidInputError(f"{source}: missing key 'size' in [input]")
    runtime = document["runtime"]
    _check_choice(runtime, RUNTIMES, source, "runtime")
    pooling = document.get("pooling", "none")
    _check_choice(pooling, POOLINGS, source, "pooling")
    layout = document.get("layout", "nhwc")
    _check_choice(layout, LAYOUTS, source, "layout")
    for key in ("architecture",):
        if key in document and runtime != "keras":
            raise InvalidInputError(f"{source}: {key!r} applies to the keras runtime only, not {runtime!r}")
    if "signature" in document and runtime != "savedmodel":
        raise InvalidInputError(f"{source}: 'signature' applies to the savedmodel runtime only, not {runtime!r}")
    sha256 = document.get("sha256")
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
        raise InvalidInputError(f"{source}: 'sha256' must be 64 hex digits, got {sha256!r}")
    size, channels = inputs["size"], inputs.get("channels", 3)
    if size < 1 or channels not in (1, 3):
        raise InvalidInputError(f"{source}: [input] size must be positive and channels 1 or 3, "
                                f"got size {size}, channels {channels}")
    for key in ("version", "output_dim"):
        if key in document and document[key] < 1:
            raise InvalidInputError(f"{source}: {key!r} must be positive, got {document[key]}")
    try:
        preprocessing = preprocessing_from(document.get("preprocessing", {}))
    except (InvalidInputError, UnknownNameError) as e:
        raise InvalidInputError(f"{source}: [preprocessing]: {e}") from e
    return ModelConfig(
        name=name, folder=folder, runtime=runtime, file=document["file"], input_size=size,
        preprocessing=preprocessing, summary=document.get("summary", ""), version=document.get("version", 1),
        sha256=sha256.lower() if sha256 else None, architecture=document.get("architecture"),
        signature=document.get("signature"), cut=document.get("cut"), pooling=pooling,
        output_dim=document.get("output_dim"), missing=document.get("missing"), layout=layout,
        channels=channels, resizable=inputs.get("resizable", False), min_input_size=inputs.get("min_size", 1),
        measured=document.get("measured"))


def preprocessing_from(table: dict) -> Preprocessing:
    """A [preprocessing] table: a preset, any field of it overridden (then named "custom"), or all fields."""
    base = preset(table["preset"]) if "preset" in table else Preprocessing(name="custom")
    changes = {}
    for key in ("pad_to", "channel_order", "dtype"):
        if key in table:
            changes[key] = table[key]
    for key in ("mean", "std"):
        if key in table:
            value = table[key]
            changes[key] = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
    if not changes:
        return base
    return dataclasses.replace(base, name="custom", **changes)


def write_config(config: ModelConfig, folder: str | Path) -> Path:
    """Write `folder/config.toml` atomically."""
    import os

    import tomli_w

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CONFIG_FILE
    partial = folder / f".{CONFIG_FILE}.{os.getpid()}"
    partial.write_text(f"# {config.name}: {config.summary}\n" + tomli_w.dumps(config.to_toml()))
    os.replace(partial, target)
    return target


def _check_table(table: dict, schema: dict, source: str, where: str, tables: dict | None = None) -> None:
    place = f" in [{where}]" if where else ""
    for key, value in table.items():
        if tables and key in tables:
            continue
        if key not in schema:
            raise InvalidInputError(
                f"{source}: unknown key {key!r}{place}; known: {', '.join(sorted(schema))}")
        expected = schema[key]
        kinds = expected if isinstance(expected, tuple) else (expected,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if isinstance(value, list):
            ok = list in kinds and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            raise InvalidInputError(f"{source}: key {key!r}{place} must be {names}, got {type(value).__name__} "
                                    f"{value!r}")


def _check_choice(value: str, choices, source: str, key: str) -> None:
    if value not in choices:
        raise InvalidInputError(f"{source}: {key} {value!r} is not one of {', '.join(choices)}")
