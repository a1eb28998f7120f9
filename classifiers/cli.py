"""The `classifiers` command line (also `python -m classifiers`): the lecture's experiments, head comparisons."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("classifiers")

EPILOG = """examples:
  classifiers run                         # the three experiments, short default
  classifiers run --full                  # every row at the lecture's full settings (hours)
  classifiers run --experiments cifar_vgg --trials 5
  classifiers compare --train-set NAME --test-set NAME --heads linear,mlp512-tanh,logreg,knn
  classifiers train --train-set NAME --head logreg --out heads/digits   # then: extractor serve --heads heads
  classifiers export --head heads/digits.skops --out deploy/digits --format onnx   # backbone + head, on pixels
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classifiers", description="Heads trained on cached features.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the log on the terminal (it is always in RUNS/<timestamp>/run.log)")
    parser.add_argument("--store", help="embedding store (env EXTRACTOR_STORE; default in the user cache)")
    parser.add_argument("--runs-dir", default="runs", help="where reports go: RUNS/<timestamp>/ (default runs)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="reproduce the lecture's table (tl_mnist, mnist_vgg, cifar_vgg)",
                              description="Embed what is missing, train every row's trials, print the table "
                                          "beside the lecture's ranges, write report.json, report.md and plots.")
    run.add_argument("--experiments", default="tl_mnist,mnist_vgg,cifar_vgg", help="comma-separated names")
    run.add_argument("--full", action="store_true",
                     help="from-scratch and classic rows at full settings too (15 trials, all epochs: hours)")
    run.add_argument("--trials", type=int, default=15, help="trials per row (default 15, as the lecture)")
    run.add_argument("--scratch-trials", type=int,
                     help="from-scratch trials to compute at least (default 1; --full: all; cached ones are shown too)")
    run.add_argument("--classic-epochs", type=int, help="epochs timed of the classic rows (default 1; --full: all)")
    run.add_argument("--no-beyond", action="store_true", help="only the rows that reproduce the lecture")
    run.add_argument("--no-explored", action="store_true",
                     help="leave out the explored rows (fine-tuned block 5, optimiser x learning-rate sweep, "
                          "augmentation)")
    run.add_argument("--data-dir", help="shared datasets and weights (env EXTRACTOR_DATA_DIR)")
    run.set_defaults(run=cmd_run)

    compare = commands.add_parser("compare", help="compare heads on any two feature sets of the store",
                                  description="Train every head over the trials on cached features; print and "
                                              "write the same table, JSON and plots.")
    compare.add_argument("--train-set", required=True, help="feature set to train on (see `extractor store info`)")
    compare.add_argument("--test-set", required=True, help="feature set to test on (see `extractor store info`)")
    compare.add_argument("--heads", default="linear,mlp512-tanh,logreg",
                         help="comma-separated: KerasHead specs (linear, dropout-linear, mlp512-tanh, ...) "
                              "or logreg, knn, linear-svm, ridge")
    compare.add_argument("--trials", type=int, default=15, help="seeds per head (default 15)")
    compare.add_argument("--epochs", type=int, default=100, help="epochs of Keras heads (default 100)")
    compare.add_argument("--batch-size", type=int, default=4, help="batch size of Keras heads (default 4)")
    compare.add_argument("--optimizers", help="sweep Keras heads over these optimizers (adam, rmsprop, sgd) x "
                                              "--learning-rates; the pick is made on a validation split")
    compare.add_argument("--learning-rates", help="comma-separated rates to sweep (default with --optimizers: "
                                                  "1e-4,3e-4,1e-3,3e-3,1e-2)")
    compare.add_argument("--validation-fraction", type=float, default=0.2,
                         help="share of the training set held out to pick the sweep's point (default 0.2)")
    compare.set_defaults(run=cmd_compare)

    train = commands.add_parser("train", help="train one head on a feature set and save it for serving",
                                description="Train a head on a feature set of the store and save it (with its "
                                            "backbone fingerprint, class names and sha256) where "
                                            "`extractor serve --heads DIR` finds it.")
    train.add_argument("--train-set", required=True, help="feature set to train on (see `extractor store info`)")
    train.add_argument("--head", required=True, help="a KerasHead spec or logreg, knn, linear-svm, ridge")
    train.add_argument("--out", required=True, help="model file to write (suffix .keras or .skops is added)")
    train.add_argument("--epochs", type=int, default=100, help="epochs of Keras heads (default 100)")
    train.add_argument("--batch-size", type=int, default=4, help="batch size of Keras heads (default 4)")
    train.add_argument("--seed", type=int, default=0, help="seed of the head's initial weights and batch order "
                                                             "(default 0)")
    train.set_defaults(run=cmd_train)

    export = commands.add_parser(
        "export", help="write a saved head with its backbone as one model that runs on pixels",
        description="Write preprocessing, the frozen backbone up to its cut and a saved head as one model: "
                    "(n, S, S, C) uint8 pixels at the backbone's input size in, class probabilities out. Plain "
                    "Keras, TF Serving, the TFLite interpreter or ONNX Runtime run it; `extractor models add "
                    "NAME --file F --recipe uint8` takes the Keras file back.")
    export.add_argument("--head", required=True, help="a head saved by `classifiers train` (.keras or .skops)")
    export.add_argument("--out", required=True, help="file to write (the format's suffix is added; a folder for "
                                                     "savedmodel)")
    export.add_argument("--format", choices=["keras", "savedmodel", "tflite", "onnx"], default="keras",
                        help="keras (.keras), savedmodel (TF Serving), tflite, onnx (needs the onnx extra); "
                             "default keras")
    export.add_argument("--backbone", help="the model repository entry the head's vectors came from (default: "
                                           "the entry at its defaults whose fingerprint the head records)")
    export.add_argument("--recipe", help="the preprocessing preset the vectors were embedded with, if not the "
                                         "entry's")
    export.add_argument("--input-size", type=int, help="the input size the vectors were embedded at, if not the "
                                                       "entry's")
    export.add_argument("--pooling", help="the pooling the vectors were embedded with, if not the entry's")
    export.add_argument("--model-repository", metavar="DIR", help="your model repository, searched before the "
                                                                  "shipped one")
    export.add_argument("--data-dir", help="shared datasets and weights (env EXTRACTOR_DATA_DIR)")
    export.set_defaults(run=cmd_export)
    return parser


def cmd_run(args) -> int:
    from extractor.models.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # before anything imports it: no start-up banners
    from classifiers.experiments import EXPERIMENTS, ExperimentRunner, RunSettings
    from classifiers.report import format_table, new_run_dir, write_report
    from extractor import paths
    from extractor.console import log_to_file
    from extractor.errors import UnknownNameError
    from extractor.pretrain import pretrain_mnist_cnn
    from extractor.store import EmbeddingStore

    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    for name in names:
        if name not in EXPERIMENTS:
            raise UnknownNameError("experiment", name, EXPERIMENTS)
    started = time.perf_counter()
    run_dir = new_run_dir(Path(args.runs_dir))
    log_file = log_to_file(run_dir / "run.log")
    progress = sys.stderr.isatty()
    phases: dict[str, float] = {}
    if any(EXPERIMENTS[name].pretrains_source_cnn for name in names):
        pretrain_started = time.perf_counter()
        path, meta = pretrain_mnist_cnn(data_dir=args.data_dir, progress=progress)
        phases["pretraining"] = round(time.perf_counter() - pretrain_started, 1)
        log.info("pretrained mnist_cnn ready (%s, %.1f s)", path, phases["pretraining"])
    settings = RunSettings(full=args.full, trials=args.trials, scratch_trials=args.scratch_trials,
                           classic_epochs=args.classic_epochs, beyond=not args.no_beyond,
                           explored=not args.no_explored)
    results = []
    with EmbeddingStore(paths.store_path(args.store)) as store:
        runner = ExperimentRunner(store, settings, args.data_dir, progress=progress)
        for name in names:
            experiment_started = time.perf_counter()
            result = runner.run(EXPERIMENTS[name])
            phases[name] = round(time.perf_counter() - experiment_started, 1)
            results.append(result)
            print(format_table(result) + "\n", flush=True)
    timings = {r.name: r.details["timing"] for r in results if r.details.get("timing")}
    speedups = [f"{name}: full transfer table classic {t['classic_full_table_seconds']:.0f} s (steady-state steps, "
                f"extrapolated) vs cached {t['cached_full_table_seconds']:.1f} s (this run: embedding "
                f"{t['cached_embed_seconds']:.1f} s{' (vectors reused)' * (not t['embedded_now'])} + training "
                f"{t['cached_train_seconds']:.1f} s): {t['speedup']:.0f}x faster "
                f"({t['speedup_range'][0]:.0f}-{t['speedup_range'][1]:.0f}x)"
                for name, t in timings.items()]
    print("\n".join(speedups))
    total = time.perf_counter() - started
    phase_line = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in phases.items())
    header = (f"Mode: {'full lecture settings' if args.full else 'short default (see notes)'}; "
              f"{args.trials} trials per cached row; total {total:.0f} s ({phase_line}).\n\n"
              + "".join(f"- {line}\n" for line in speedups))
    write_report(run_dir, results, {"mode": "full" if args.full else "default", "total_seconds": round(total, 1),
                                    "phase_seconds": phases},
                 {name: {"classic": t["classic_full_table_seconds"], "cached": t["cached_full_table_seconds"]}
                  for name, t in timings.items()}, header)
    print(f"\nreport: {run_dir}/report.md (and report.json, plots); log: {log_file}\n"
          f"total {total:.0f} s ({phase_line})")
    return 0


def cmd_compare(args) -> int:
    from extractor.models.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # before anything imports it: no start-up banners
    from classifiers import api
    from classifiers.report import new_run_dir, write_report

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    result = api.compare_heads(args.train_set, args.test_set, heads, store=args.store, trials=args.trials,
                               epochs=args.epochs, batch_size=args.batch_size, optimizers=args.optimizers,
                               learning_rates=args.learning_rates, validation_fraction=args.validation_fraction)
    print(api.format_table(result))
    run_dir = new_run_dir(Path(args.runs_dir), latest="latest-compare")  # runs/latest stays the main job's
    write_report(run_dir, [result])
    print(f"\nreport: {run_dir}/report.md (runs/latest-compare points at it)")
    return 0


def cmd_train(args) -> int:
    from extractor.models.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()  # before anything imports it: no start-up banners
    from classifiers import api

    trained = api.train_head(args.head, args.train_set, store=args.store, out=args.out, seed=args.seed,
                             epochs=args.epochs, batch_size=args.batch_size)
    print(f"{trained.path}  ({args.head} on {args.train_set}: {len(trained.model.classes_)} classes, "
          f"training accuracy {trained.training_accuracy:.3f})")
    return 0


def cmd_export(args) -> int:
    from classifiers import api

    path = api.export_head(args.head, args.out, args.format, backbone=args.backbone, recipe=args.recipe,
                           input_size=args.input_size, pooling=args.pooling, repository=args.model_repository,
                           data_dir=args.data_dir)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from extractor.console import run_command
    from extractor.errors import ExtractorError

    return run_command(build_parser(), argv, expected=(ExtractorError, ValueError))
