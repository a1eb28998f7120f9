"""`extractor models ...`: add, list, show, check, optimize and remove model repository entries from the command line."""

from __future__ import annotations

import argparse
import json
import time

from extractor.errors import InvalidInputError

MODELS_EPILOG = """examples:
  extractor models add lite0 --file ~/models/efficientnet_lite0.keras --recipe lite --cut embedding
  extractor models add mine --file model.onnx --cut /features/pool --recipe torch
  extractor models list
  extractor models show lite0
  extractor models check lite0
  extractor models optimize vgg16 --runtime tflite --quantize dynamic-int8 --data cifar10:test?per_class=20
  extractor embed --backbone lite0 --data folder:~/photos --feature-set photos-lite0
"""


def add_model_commands(commands) -> None:
    models = commands.add_parser(
        "models", help="the model repository: add your own models, list, show, check, remove",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODELS_EPILOG,
        description="A model repository is a folder with one subfolder per model: its config.toml (runtime, "
                    "file and sha256, cut, input size, preprocessing, pooling) beside the model file. Yours "
                    "(--model-repository) is searched before the one shipped with the project.")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="add a model file as an entry (loaded once to check the cut)",
        description="Copy a model file into the repository with a config, after loading it once through the "
                    "same code that embeds with it and checking the cut. Nothing is written if a check fails.")
    add.add_argument("name", help="entry name (letters, digits, '.', '_', '-')")
    add.add_argument("--file", required=True, help="the model: .keras/.h5, a SavedModel folder, .tflite or .onnx; "
                                                   "for --architecture, its weights file")
    add.add_argument("--format", choices=["keras", "savedmodel", "tflite", "onnx"],
                     help="the runtime (default: from the file name)")
    add.add_argument("--cut", help="layer (Keras), tensor (TFLite), output key (SavedModel) or node output "
                                   "(ONNX) whose output is the embedding (default: the model's first output)")
    add.add_argument("--input-size", type=int, help="square input size (default: the model's own)")
    add.add_argument("--pooling", choices=["none", "flatten", "avg", "max"],
                     help="how the cut's output becomes a vector (default: none for (n, d), avg for maps)")
    add.add_argument("--architecture", help="a keras.applications name (VGG16, ResNet50, ...) built with "
                                            "--file as its weights, or 'imagenet' weights with internet")
    add.add_argument("--signature", help="SavedModel signature (default serving_default)")
    add.add_argument("--summary", default="", help="one line saying what the model is")
    add.add_argument("--no-copy", action="store_true",
                     help="refer to the file where it is instead of copying it into the repository")
    group = add.add_argument_group("preprocessing (default: uint8 models get pixels as they are, float "
                                   "models pixels / 255)")
    group.add_argument("--recipe", help="a preset: lecture, unit, caffe, tf, torch, lite, raw, uint8")
    group.add_argument("--mean", help="per-channel (or one) value subtracted from 0..255 pixels, e.g. 127")
    group.add_argument("--std", help="per-channel (or one) divisor after the mean, e.g. 128")
    group.add_argument("--channel-order", choices=["rgb", "bgr"], help="the model's channel order")
    group.add_argument("--pad-to", type=int, help="zero-pad smaller images to this size before resizing")
    add.set_defaults(run=cmd_models_add)

    listing = actions.add_parser("list", help="every entry: runtime, input, width, fingerprint")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.set_defaults(run=cmd_models_list)
    show = actions.add_parser("show", help="one entry in full, with the layer names near its cut")
    show.add_argument("name", help="the entry to show (see `extractor models list`)")
    show.set_defaults(run=cmd_models_show)
    check = actions.add_parser("check", help="build an entry, run sample images: output shape, images/s")
    check.add_argument("name", help="the entry to build and run on sample images")
    check.add_argument("--images", type=int, default=64, help="sample images to time (default 64)")
    check.set_defaults(run=cmd_models_check)
    optimize = actions.add_parser(
        "optimize", help="convert a Keras entry to TFLite, ONNX or mixed-bfloat16 Keras; measure what it gains",
        description="Convert a Keras entry's cut model (pooling included, preprocessing unchanged) and add it as a "
                    "new entry with its own fingerprint. Its config's [measured] table records the forward "
                    "speed-up against the source entry and the deviation of its vectors (max abs, min cosine) on "
                    "sample images.")
    optimize.add_argument("name", help="a Keras entry")
    optimize.add_argument("--runtime", required=True, metavar="tflite|onnx|keras",
                          help="tflite (TFLiteConverter), onnx (tf2onnx, opset 17) or keras (mixed bfloat16)")
    optimize.add_argument("--quantize", metavar="PRECISION",
                          help="tflite: none (default), float16, dynamic-int8; onnx: none (default), dynamic-int8; "
                               "keras: bfloat16 (the default)")
    optimize.add_argument("--as", dest="new_name", metavar="NEWNAME",
                          help="the new entry's name (default e.g. vgg16_tflite_int8)")
    optimize.add_argument("--input-size", type=int, help="convert at this input size (resizable entries only)")
    optimize.add_argument("--data", help="sample images for the measurement, a data spec such as "
                                         "cifar10:test?per_class=20 (default: random images)")
    optimize.add_argument("--images", type=int, default=128, help="sample images measured (default 128)")
    optimize.set_defaults(run=cmd_models_optimize)
    remove = actions.add_parser("remove", help="delete an entry of your repository (and its copied file)")
    remove.add_argument("name", help="the entry to remove from your repository")
    remove.set_defaults(run=cmd_models_remove)
    for action in (add, listing, show, check, optimize, remove):
        action.add_argument("--model-repository", metavar="DIR",
                            help="your model repository (env EXTRACTOR_MODEL_REPOSITORY; default "
                                 "<cache>/model-repository)")

    alias = commands.add_parser("backbones", help="the same as `models list`")
    alias.add_argument("--json", action="store_true", help="print a JSON list")
    alias.set_defaults(run=cmd_models_list, model_repository=None)


def _repository(args):
    from extractor.models import ModelRepository

    return ModelRepository(args.model_repository, getattr(args, "data_dir", None))


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidInputError(f"{option} takes numbers separated by commas, got {text!r}") from None


def preprocessing_from_args(args):
    """The preset, with any of mean, std, channel order and padding overridden, or None for the default."""
    from extractor.models.config import preprocessing_from

    table = {key: value for key, value in (
        ("preset", args.recipe), ("mean", _floats(args.mean, "--mean")), ("std", _floats(args.std, "--std")),
        ("channel_order", args.channel_order), ("pad_to", args.pad_to)) if value is not None}
    for key in ("mean", "std"):
        if key in table:
            table[key] = list(table[key])
    return preprocessing_from(table) if table else None


def cmd_models_add(args) -> int:
    spec = _repository(args).add(
        args.name, args.file, runtime=args.format, cut=args.cut, input_size=args.input_size,
        preprocessing=preprocessing_from_args(args), pooling=args.pooling, architecture=args.architecture,
        signature=args.signature, summary=args.summary, copy=not args.no_copy)
    print(f"added {spec.name}: {spec.runtime}, cut {spec.cut}, input {spec.input_size}, "
          f"{spec.preprocessing.name} preprocessing, pooling {spec.pooling}, {spec.config.output_dim}-d\n"
          f"entry       {spec.config.folder}\nfingerprint {spec.fingerprint}")
    return 0


def _entries(repository) -> list[dict]:
    """Every entry described; one whose config is broken is listed with its error, not fatal to the rest."""
    rows = []
    for name in repository.names():
        try:
            rows.append(repository.spec(name).describe())
        except InvalidInputError as e:
            rows.append({"name": name, "error": str(e)})
    return rows


def cmd_models_list(args) -> int:
    repository = _repository(args)
    rows = _entries(repository)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<20}{'runtime':<11}{'input':>6}{'dim':>7}  {'preprocessing':<14}{'pooling':<9}fingerprint")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<20}UNAVAILABLE  {row['error']}")
            continue
        fingerprint = row["fingerprint"][:16] if row["fingerprint"] else f"(missing file: {row['file']})"
        print(f"{row['name']:<20}{row['runtime']:<11}{row['input_size']:>6}{row['output_dim'] or '?':>7}  "
              f"{row['preprocessing']:<14}{row['pooling']:<9}{fingerprint}")
    print(f"\nrepositories: {', '.join(str(f) for f in repository.folders)}")
    return 0


def cmd_models_show(args) -> int:
    from extractor.models.runtimes import inspect_model

    spec = _repository(args).spec(args.name)
    entry = spec.describe()
    for key in ("name", "summary", "version", "runtime", "file", "sha256", "architecture", "cut", "input_size",
                "channels", "resizable", "preprocessing", "pooling", "output_dim", "fingerprint", "folder"):
        if entry.get(key) is not None:
            print(f"{key:<14}{entry[key]}")
    print(f"{'':<14}{spec.preprocessing.describe()}")
    if entry.get("measured"):
        print(f"{'measured':<14}{json.dumps(entry['measured'])}")
    info = inspect_model(spec.runtime, spec.path, architecture=spec.config.architecture,
                         signature=spec.config.signature, input_size=spec.input_size)
    names = list(info.names)
    at = names.index(spec.cut) if spec.cut in names else 0
    print(f"model input   {info.input_shape} {info.input_dtype}, {len(names)} layers/tensors; near the cut:")
    for i in range(max(0, at - 5), min(len(names), at + 4)):
        print(f"  {'>' if i == at else ' '} {names[i]}")
    return 0


def cmd_models_check(args) -> int:
    import numpy as np

    from extractor.models import load_backbone

    spec = _repository(args).spec(args.name)
    started = time.perf_counter()
    backbone = load_backbone(spec)
    built = time.perf_counter() - started
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, spec.input_shape, dtype=np.uint8) for _ in range(max(args.images, 1))]
    backbone.embed(images[:8])  # warm-up: tracing and first-call allocations are not the steady rate
    started = time.perf_counter()
    vectors = backbone.embed(images)
    seconds = time.perf_counter() - started
    print(f"{spec.name}: built in {built:.1f} s; output {vectors.shape} {vectors.dtype}, "
          f"{len(images) / seconds:.1f} images/s (preprocess + forward, {len(images)} images)\n"
          f"fingerprint {spec.fingerprint}")
    return 0


def cmd_models_optimize(args) -> int:
    from extractor.models.optimize import check_target, optimize_entry

    check_target(args.runtime, args.quantize)  # before a dataset is opened or a model built
    if args.images < 1:
        raise InvalidInputError(f"--images must be at least 1, got {args.images}")
    images, sample = None, "random"
    if args.data:
        from extractor.datasets import open_dataset

        dataset = open_dataset(args.data, getattr(args, "data_dir", None))
        images = [image for batch in dataset.batches(args.images, args.images) for image in batch.images]
        sample = dataset.spec
    result = optimize_entry(_repository(args), args.name, runtime=args.runtime, quantize=args.quantize,
                            new_name=args.new_name, input_size=args.input_size, images=images,
                            sample_images=args.images, sample=sample)
    spec, measured = result.spec, result.measured
    print(f"added {spec.name}: {spec.runtime} ({measured['quantization']}) from {measured['source']}, "
          f"{spec.config.output_dim}-d\n"
          f"speed       {measured['images_per_second']:.1f} images/s vs {measured['source_images_per_second']:.1f}: "
          f"{measured['speedup']:.2f}x (forward, {measured['sample_images']} {sample} images)\n"
          f"deviation   max abs {measured['max_abs_deviation']:.3g}, min cosine {measured['min_cosine']:.6f}\n"
          f"entry       {spec.config.folder}\nfingerprint {spec.fingerprint}")
    return 0


def cmd_models_remove(args) -> int:
    folder = _repository(args).remove(args.name)
    print(f"removed {args.name} ({folder})")
    return 0
