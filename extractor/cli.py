"""The `extractor` command line (also `python -m extractor`): models, pretrain, embed, store, serve, classify."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from extractor.console import run_command
from extractor.errors import InvalidInputError
from extractor.model_commands import add_model_commands

EPILOG = """examples:
  extractor models list
  extractor models add lite0 --file efficientnet_lite0.keras --recipe lite --cut embedding
  extractor pretrain mnist_cnn
  extractor embed --backbone vgg16 --data cifar10:test --feature-set cifar10-test
  extractor embed --backbone vgg16 --recipe caffe --input-size 64 --data folder:~/photos --feature-set photos
  extractor embed --engine ray --num-workers 4 --backbone vgg16 --data cifar10:train --feature-set c10
  extractor store info
  extractor store import --store other.sqlite ~/.cache/extractor/shards/c10/manifest.json
  extractor serve --port 50051 --backbones vgg16 --heads ~/heads
  extractor embed --remote localhost:50051 --backbone vgg16 --data npz:digits.npz --feature-set digits
  extractor classify --remote localhost:50051 --head digits-lr a.png b.png
"""


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and configure a backbone (shared by every command that embeds)."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", required=True, help="model repository entry (see `extractor models list`)")
    group.add_argument("--recipe", help="preprocessing preset instead of the entry's (lecture, unit, caffe, tf, "
                                        "torch, lite, raw, uint8)")
    group.add_argument("--input-size", type=int, help="square input size in pixels (default: the entry's; only "
                                                      "for resizable entries)")
    group.add_argument("--pooling", help="none | flatten | avg | max (default: the entry's)")
    add_repository_option(group)


def add_repository_option(parser) -> None:
    parser.add_argument("--model-repository", metavar="DIR",
                        help="your model repository, searched before the shipped one (env "
                             "EXTRACTOR_MODEL_REPOSITORY; default <cache>/model-repository)")


def spec_from_args(args: argparse.Namespace):
    from extractor.models import get_backbone_spec

    return get_backbone_spec(args.backbone, input_size=args.input_size, recipe=args.recipe, pooling=args.pooling,
                             repository=args.model_repository, data_dir=args.data_dir)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The options that run `embed` on Ray Data instead of in this process."""
    group = parser.add_argument_group("engine (Ray options need `pip install .[ray]`)")
    group.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: in this process (default); ray: on Ray Data, into Parquet shards, then imported")
    group.add_argument("--address", help="Ray cluster to join, e.g. HEAD:6379 or auto (default: start Ray in-process)")
    group.add_argument("--num-workers", type=int, help="backbone actors, one CPU each (default 2)")
    group.add_argument("--shards-dir", help="folder for the Parquet shards and manifest.json, on storage every "
                                            "node shares (default: per feature set in the user cache)")
    group.add_argument("--shard-size", type=int, help="dataset items per shard (default 1024)")


def add_store_import(store_commands) -> None:
    action = store_commands.add_parser(
        "import", help="bring vectors into the store as a feature set: shards, exports, or any tool's vectors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a shards folder or its manifest.json (each shard checked against the sha256 it lists), "
                    "or Parquet files\nthis project wrote, in order, as a feature set; vectors already stored are "
                    "kept.\n\nWith --parquet or --npy: vectors made by another tool, as an external feature set "
                    "(no backbone,\nno fingerprint) that heads, `classifiers compare` and exports use like any other.",
        epilog="examples:\n"
               "  extractor store import ~/.cache/extractor/shards/c10/manifest.json\n"
               "  extractor store import --parquet clip.parquet --vector-column embedding --label-column label "
               "--source-column path --as clip-train\n"
               "  extractor store import --npy X.npy --labels y.npy --as colleague-train")
    action.add_argument("sources", nargs="*", metavar="SHARDS_OR_MANIFEST",
                        help="a shards folder, its manifest.json, or Parquet files written by this project")
    action.add_argument("--store", help="store file (env EXTRACTOR_STORE; default in the user cache)")
    action.add_argument("--feature-set", "--as", dest="feature_set", metavar="NAME",
                        help="name to import as (default for shards: the name they record; required otherwise)")
    foreign = action.add_argument_group("vectors made by another tool")
    foreign.add_argument("--parquet", metavar="FILE", help="a Parquet file holding one vector per row")
    foreign.add_argument("--vector-column", metavar="C", help="--parquet: the column of vectors (lists of numbers)")
    foreign.add_argument("--label-column", metavar="L",
                         help="--parquet: the column of labels, integers or class names (default: one class)")
    foreign.add_argument("--source-column", metavar="S",
                         help="--parquet: the column naming each row's file, kept for joins (default: row number)")
    foreign.add_argument("--npy", metavar="FILE", help="a .npy file holding an (n, d) array of vectors")
    foreign.add_argument("--labels", metavar="FILE",
                         help="--npy: a .npy file of n labels, integers or class names (default: one class)")
    action.set_defaults(run=cmd_store_import)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extractor", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run frozen pretrained backbones once over images and keep their embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the log on the terminal (INFO and DEBUG)")
    parser.add_argument("--data-dir", help="shared datasets and weights (env EXTRACTOR_DATA_DIR; default ../shared/data)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_model_commands(commands)

    pretrain = commands.add_parser("pretrain", help="pretrain a source-dataset backbone (mnist_cnn)")
    pretrain.add_argument("name", choices=["mnist_cnn"], help="the backbone to pretrain")
    pretrain.add_argument("--epochs", type=int, default=15, help="training epochs (default 15, as the lecture)")
    pretrain.add_argument("--batch-size", type=int, default=128, help="images per training step (default 128)")
    pretrain.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order "
                                                                "(default 0)")
    pretrain.add_argument("--force", action="store_true", help="retrain even if a saved model exists")
    pretrain.set_defaults(run=cmd_pretrain)

    embed = commands.add_parser(
        "embed", help="embed a dataset into a feature set of the store",
        description="Embed a dataset into a named feature set. Vectors already in the store are reused; "
                    "a killed job, rerun, computes only what is missing.")
    add_backbone_options(embed)
    embed.add_argument("--data", required=True, metavar="SPEC",
                       help="mnist:SPLIT, cifar10:SPLIT, folder:PATH or npz:PATH (options after ?, e.g. "
                            "mnist:small?n=100&seed=3)")
    embed.add_argument("--feature-set", required=True, help="name of the feature set to write")
    embed.add_argument("--store", help="store file (env EXTRACTOR_STORE; default in the user cache)")
    embed.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    embed.add_argument("--limit", type=int, help="embed only the first N images")
    embed.add_argument("--json", action="store_true", help="print the summary as JSON")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_options(embed)
    embed.set_defaults(run=cmd_embed)
    add_remote_options(embed, required=False, help="compute on this feature service; the feature set and its vectors "
                                                   "land in the local --store (and the vectors in the server's)")

    store = commands.add_parser("store", help="inspect and maintain the store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    for name, help_text in (("info", "vectors, size and feature sets"),
                            ("verify", "check every page, checksum and reference; list each problem; exit 1 on any"),
                            ("repair", "copy what is intact of a damaged store into a new file"),
                            ("export", "write a feature set as Parquet or .npy files that join back to its files"),
                            ("gc", "show (with --yes: delete) vectors no feature set refers to"),
                            ("drop", "forget a feature set, such as a server's served:... set; gc then deletes "
                                     "the vectors no other set refers to")):
        action = store_commands.add_parser(name, help=help_text)
        action.add_argument("--store", help="store file (env EXTRACTOR_STORE; default in the user cache)")
        action.set_defaults(run=cmd_store)
        if name == "export":
            action.add_argument("--feature-set", required=True, help="the feature set to write (see `store info`)")
            action.add_argument("--format", choices=["npy", "parquet"], default="parquet",
                                help="parquet: one file, columns key, source, label, label_name, vector; npy: X.npy, "
                                     "y.npy, keys.npy and rows.csv, metadata.json beside them (default parquet)")
            action.add_argument("--out", required=True, help="folder (npy) or file (parquet)")
        if name == "repair":
            action.add_argument("--out", required=True, help="the new store file to write (must not exist)")
        if name == "gc":
            action.add_argument("--yes", action="store_true", help="delete; without it gc only shows what it would")
        if name == "drop":
            action.add_argument("feature_set", metavar="NAME", help="the feature set to forget (see `store info`)")
        if name == "info":
            action.add_argument("--json", action="store_true", help="print the store's summary as JSON")
    add_store_import(store_commands)
    add_service_commands(commands)
    return parser


def cmd_pretrain(args) -> int:
    from extractor.pretrain import pretrain_mnist_cnn

    path, meta = pretrain_mnist_cnn(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                    force=args.force, data_dir=args.data_dir, progress=sys.stderr.isatty())
    print(f"{path}\nsha256 {meta['sha256']}\ntest accuracy (digits 0,2,4,6,8): "
          f"{meta['test_accuracy_even_digits']:.4f}")
    return 0


def cmd_embed(args) -> int:
    from extractor import api

    if uses_ray_engine(args):
        if args.remote:
            raise InvalidInputError("--remote and --engine ray are two different engines: choose one")
        return cmd_embed_ray(args)
    spec, backbone = remote_backbone(args) if args.remote else (spec_from_args(args), None)
    summary = api.embed_to_store(args.data, spec, args.feature_set, store=args.store, batch_size=args.batch_size,
                                 limit=args.limit, data_dir=args.data_dir, backbone=backbone,
                                 progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(summary.as_dict(), indent=2) if args.json else "\n".join(summary.lines()))
    return 0


def uses_ray_engine(args) -> bool:
    """Whether `embed` runs on Ray; Ray options given to the local engine are an error, not ignored."""
    given = [flag for flag, value in (("--address", args.address), ("--num-workers", args.num_workers),
                                      ("--shards-dir", args.shards_dir), ("--shard-size", args.shard_size))
             if value is not None]
    if args.engine != "ray" and given:
        raise InvalidInputError(f"{', '.join(given)} only apply with --engine ray")
    return args.engine == "ray"


def cmd_embed_ray(args) -> int:
    from extractor import paths
    from extractor.datasets import open_dataset
    from extractor.ray_engine.runner import RayOptions, import_ray, run_ray_embed_job
    from extractor.store import EmbeddingStore

    import_ray()  # before any work, so a missing extra fails at once with the install command
    options = RayOptions(**{name: value for name, value in (
        ("address", args.address), ("num_workers", args.num_workers), ("shard_size", args.shard_size))
        if value is not None})
    spec = spec_from_args(args)
    dataset = open_dataset(args.data, args.data_dir)
    with EmbeddingStore(paths.store_path(args.store)) as store:
        summary = run_ray_embed_job(dataset, spec, store, args.feature_set,
                                    paths.shards_dir(args.shards_dir, args.feature_set), options,
                                    batch_size=args.batch_size, limit=args.limit, data_dir=args.data_dir,
                                    progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(summary.as_dict(), indent=2) if args.json else "\n".join(summary.lines()))
    return 0


def cmd_store_import(args) -> int:
    from extractor import api

    given = [flag for flag, value in (("SHARDS_OR_MANIFEST", args.sources), ("--parquet", args.parquet),
                                      ("--npy", args.npy)) if value]
    if len(given) != 1:
        raise InvalidInputError("give one of: shards (a folder, manifest.json or Parquet files), --parquet FILE, "
                                f"--npy FILE{'; got ' + ', '.join(given) if given else ''}")
    parquet_only = [flag for flag, value in (("--vector-column", args.vector_column),
                                             ("--label-column", args.label_column),
                                             ("--source-column", args.source_column)) if value]
    if parquet_only and not args.parquet:
        raise InvalidInputError(f"{', '.join(parquet_only)} only apply with --parquet")
    if args.labels and not args.npy:
        raise InvalidInputError("--labels only applies with --npy")
    if args.sources:
        summary = api.import_shards(args.sources, feature_set=args.feature_set, store=args.store)
    elif not args.feature_set:
        raise InvalidInputError("vectors from another tool need a feature set name: --as NAME")
    elif args.parquet:
        if not args.vector_column:
            raise InvalidInputError("--parquet needs --vector-column: the column holding the vectors")
        summary = api.import_parquet(args.parquet, args.feature_set, vector_column=args.vector_column,
                                     label_column=args.label_column, source_column=args.source_column,
                                     store=args.store)
    else:
        summary = api.import_npy(args.npy, args.feature_set, labels=args.labels, store=args.store)
    print("\n".join(summary.lines()))
    return 0


def cmd_store(args) -> int:
    from extractor import api, paths
    from extractor.store import EmbeddingStore, repair_store, verify_store

    path = paths.store_path(args.store)
    if args.store_command == "verify":  # without opening it as a store: a damaged file is a finding, not an error
        report = verify_store(path)
        print(f"checked {report.vectors_checked} vectors: "
              + ("ok" if report.ok else f"{len(report.problems)} problems"))
        for problem in report.problems:
            print(f"  {problem}")
        return 0 if report.ok else 1
    if args.store_command == "repair":
        print("\n".join(repair_store(path, args.out).lines()))
        return 0
    with EmbeddingStore(path, readonly=args.store_command in ("info", "export")) as store:
        if args.store_command == "info":
            info = store.info()
            if args.json:
                print(json.dumps(info, indent=2))
                return 0
            print("\n".join(store_info_lines(info)))
            return 0
        if args.store_command == "export":
            for written in api.export_feature_set(args.feature_set, args.out, args.format, store=store):
                print(written)
            return 0
        if args.store_command == "drop":
            items = store.drop_feature_set(args.feature_set)
            print(f"dropped feature set {args.feature_set!r} ({items} items); `store gc` shows the vectors no other "
                  "set refers to")
            return 0
        print("\n".join(store.gc(dry_run=not args.yes).lines()))
        return 0


def store_info_lines(info: dict) -> list[str]:
    """`store info` as text: the store, its vectors, and a table of its feature sets under a header."""
    widths = ", ".join(f"{count} of width {width}" for width, count in sorted(info["vectors_by_width"].items()))
    lines = [f"store         {info['path']} ({info['bytes'] / 1e6:.1f} MB)",
             f"vectors       {info['vectors']}" + (f" ({widths})" if widths else ""),
             f"feature sets  {len(info['feature_sets'])}"]
    if not info["feature_sets"]:
        return lines
    header = ("feature set", "items", "state", "backbone", "fingerprint", "skipped", "data")
    rows = [(s["name"], str(s["count"]), "complete" if s["complete"] else "INCOMPLETE", s["backbone"] or "-",
             s["fingerprint"] or "-", str(s["skipped"]), s["data_spec"]) for s in info["feature_sets"]]
    return lines + [""] + aligned_columns(header, rows, right_aligned={"items", "skipped"})


def aligned_columns(header: tuple[str, ...], rows: list[tuple[str, ...]], right_aligned=frozenset()) -> list[str]:
    """A header and rows of strings as lines of aligned columns, two spaces apart; the last column is left ragged."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        padded = [cell.rjust(width) if header[i] in right_aligned else cell.ljust(width)
                  for i, (cell, width) in enumerate(zip(cells, widths))]
        return "  ".join(padded[:-1] + [cells[-1]]).rstrip()

    return [line(header), *(line(row) for row in rows)]


# --- the gRPC service: serve, and the --remote side of embed and classify ------------------------------

def add_remote_options(parser: argparse.ArgumentParser, required: bool, help: str) -> None:
    group = parser.add_argument_group("remote (a feature service over gRPC)")
    group.add_argument("--remote", metavar="HOST:PORT", required=required, help=help)
    group.add_argument("--token-file", help="file holding the server's bearer token")
    group.add_argument("--root-cert", help="PEM root certificate: connect with TLS")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request, retries included")


def add_service_commands(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve embeddings and heads over gRPC and REST (own API, Open Inference Protocol, metrics)",
        description="Serve the backbones' embeddings (and saved heads) over gRPC (the own API and the Open Inference "
                    "Protocol) and, with --http-port, REST and /metrics, through the same store as batch jobs. "
                    "Prints the bound addresses; SIGTERM drains in-flight calls and exits 0.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind, every port (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC: own API and Open Inference Protocol; 0 picks a "
                                                             "free port (default 50051)")
    serve.add_argument("--http-port", type=int, help="Open Inference Protocol over REST and /metrics (0: a free port)")
    serve.add_argument("--metrics-port", type=int, help="/metrics on a port of its own as well")
    serve.add_argument("--store", help="store file (env EXTRACTOR_STORE; default in the user cache)")
    serve.add_argument("--backbones", default="vgg16", help="comma-separated model repository entries loaded at "
                                                           "start (default vgg16); the others load at run time")
    add_repository_option(serve)
    serve.add_argument("--heads", metavar="DIR", help="folder of saved heads (.keras, .skops) to serve")
    serve.add_argument("--max-batch", type=int, default=128, help="images per backbone call (default 128)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long the first waiting image waits for others to batch with (default 5)")
    serve.add_argument("--hot-cache-mb", type=float, default=256,
                       help="recently used vectors kept in memory in front of the store (default 256)")
    from extractor.serving.requests import Limits  # numpy and Pillow's header readers only, no TensorFlow

    default = Limits()
    limits = serve.add_argument_group("limits (defaults: extractor.serving.requests.Limits; the server logs them)")
    limits.add_argument("--max-images", type=int, default=default.max_images_per_request,
                        help="images (or keys) per request (default %(default)s)")
    limits.add_argument("--max-message-mb", type=float, default=64, help="MiB per message or HTTP body (default 64)")
    limits.add_argument("--max-pixels", type=int, default=default.max_decoded_pixels,
                        help="decoded pixels per image, read from its header before decoding; also the slices a "
                             "large request is decoded and embedded in (default %(default)s)")
    limits.add_argument("--max-request-pixels", type=int, default=default.max_request_pixels,
                        help="decoded pixels per request, summed over its images (default %(default)s)")
    limits.add_argument("--max-pixels-in-flight", type=int, default=default.max_pixels_in_flight,
                        help="decoded pixels held at once by all calls together, which bounds the server's memory "
                             "(about 3 bytes a pixel); a call waits for its share, then fails RESOURCE_EXHAUSTED "
                             "(HTTP 429); at least --max-pixels (default %(default)s)")
    limits.add_argument("--max-pixel-wait-s", type=float, default=default.max_pixel_wait_seconds,
                        help="the longest a call waits for its share of --max-pixels-in-flight, less when its "
                             "deadline is sooner (default %(default)s)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS on every port (with --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--token-file", help="require 'authorization: Bearer <token>' (gRPC metadata or HTTP header) "
                                            "with the token in this file, on every port")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds in-flight calls get at shutdown")
    caps = serve.add_argument_group("concurrency (health, reflection and metadata calls are outside these caps)")
    caps.add_argument("--max-streams", type=int, default=16,
                      help="EmbedStream and ModelStreamInfer calls open at once; more: RESOURCE_EXHAUSTED (default 16)")
    caps.add_argument("--max-concurrent-calls", type=int, default=32,
                      help="other calls doing work at once, every door together; more: RESOURCE_EXHAUSTED, or HTTP "
                           "503 with Retry-After (default 32). Health and metadata calls have threads of their own")
    caps.add_argument("--stream-idle-seconds", type=float, default=30.0,
                      help="close a stream (DEADLINE_EXCEEDED) whose client sends nothing, with every request "
                           "answered, or reads nothing, for this long (default 30)")
    serve.set_defaults(run=cmd_serve, console_level=logging.INFO)  # a server's log is its output

    classify = commands.add_parser("classify", help="classify image files with a saved head on a server")
    add_remote_options(classify, required=True, help="the feature service holding the head")
    classify.add_argument("--head", required=True, help="a head the server loaded")
    classify.add_argument("--json", action="store_true", help="print JSON")
    classify.add_argument("files", nargs="+", metavar="FILE", help="image files (PNG, JPEG, ...)")
    classify.set_defaults(run=cmd_classify)


def cmd_serve(args) -> int:
    from extractor import paths
    from extractor.serving.concurrency import ConcurrencyLimits
    from extractor.serving.launch import Doors, repository_catalog, serve
    from extractor.serving.requests import Limits
    from extractor.serving.service import FeatureService
    from extractor.store import open_checked_store

    catalog = repository_catalog(args.data_dir, args.model_repository)
    specs = [catalog.spec(name.strip()) for name in args.backbones.split(",") if name.strip()]
    limits = Limits(max_images_per_request=args.max_images, max_decoded_pixels=args.max_pixels,
                    max_request_pixels=args.max_request_pixels, max_pixels_in_flight=args.max_pixels_in_flight,
                    max_pixel_wait_seconds=args.max_pixel_wait_s)
    doors = Doors(host=args.host, port=args.port, http_port=args.http_port, metrics_port=args.metrics_port,
                  token=read_token(args.token_file), tls=read_tls(args.tls_cert, args.tls_key),
                  max_message_bytes=int(args.max_message_mb * 2**20),
                  concurrency=ConcurrencyLimits(args.max_streams, args.max_concurrent_calls, args.stream_idle_seconds))

    def service(events) -> FeatureService:
        # SQLite's quick_check first: a damaged store is refused in one line, never served as SERVING
        store = open_checked_store(paths.store_path(args.store))
        return FeatureService(specs, store, catalog=catalog, limits=limits,
                              max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                              heads=lambda: saved_heads(args.heads), hot_bytes=int(args.hot_cache_mb * 2**20),
                              events=events)
    return serve(service, doors, grace=args.grace)


def load_saved_head(path: Path):
    """Load a head written by `classifiers.persistence.save_head`; its name is the file's stem."""
    import numpy as np

    from classifiers.persistence import load_head, read_sidecar
    from extractor.serving.heads import Head

    metadata = read_sidecar(path)
    model = load_head(path)  # checks the file's sha256 against the sidecar first
    names = list(metadata["class_names"])
    # predict_proba's columns follow model.classes_: integer labels index the class names
    columns = [names[int(c)] if isinstance(c, (int, np.integer)) and 0 <= c < len(names) else str(c)
               for c in model.classes_]
    return Head(path.stem, metadata["backbone_fingerprint"], columns, model)


def saved_heads(directory: str | Path | None) -> dict:
    """Every head saved in `directory` by name (none when no directory is given): what `serve` hands the core."""
    from extractor.serving.heads import load_heads

    return load_heads(directory, load_saved_head) if directory is not None else {}


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    token = read_file(path).decode().strip()
    if not token:
        raise InvalidInputError(f"token file {path} is empty")
    return token


def read_tls(cert: str | None, key: str | None) -> tuple[bytes, bytes] | None:
    if bool(cert) != bool(key):
        raise InvalidInputError("TLS needs both --tls-cert and --tls-key")
    return (read_file(cert), read_file(key)) if cert else None


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def feature_client(args):
    from extractor.serving.client import FeatureClient

    root_cert = read_file(args.root_cert) if args.root_cert else None
    return FeatureClient(args.remote, token=read_token(args.token_file), root_cert=root_cert, timeout=args.timeout)


def remote_backbone(args):
    """`embed --remote`: the local spec (its fingerprint checked against the server's) and the served backbone."""
    from extractor.serving.client import RemoteBackbone, served_spec

    client = feature_client(args)
    spec = served_spec(client, args.backbone, input_size=args.input_size, recipe=args.recipe, pooling=args.pooling)
    return spec, RemoteBackbone(client, args.backbone)


def cmd_classify(args) -> int:
    from extractor.labels import class_indices

    with feature_client(args) as client:
        result = client.classify(args.head, args.files)
    failures = {failure.index: failure for failure in result.errors}
    rows = []
    for i, path in enumerate(args.files):
        if i in failures:
            rows.append({"file": path, "error": f"{failures[i].code.name}: {failures[i].message}"})
        else:
            best = class_indices([result.labels[i]], result.class_names)[1][0]
            rows.append({"file": path, "label": result.labels[i],
                         "probability": round(float(result.probabilities[i, best]), 6),
                         "probabilities": dict(zip(result.class_names, map(float, result.probabilities[i])))})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['file']}\t" + (f"error {row['error']}" if "error" in row
                                         else f"{row['label']}\t{row['probability']:.4f}"))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)
