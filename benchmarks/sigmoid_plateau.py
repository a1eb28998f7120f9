"""cifar_vgg's sigmoid CNN from scratch: where it leaves the chance plateau, and why the row's default does not.

The lecture's no-transfer CNN (four 3x3 convolutions, two max-pools, Flatten, Dropout 0.5, Dense softmax) with
sigmoid activations, trained on pixels / 255 of each trial's 1,000 CIFAR-10 training images (100 per class,
seed = trial) with Adam. Every setting (batch size x learning rate x initialisation) trains the first --trials
trials on a stratified 80% of their images, with validation accuracy on the other 20% and the training loss
after every epoch: a trial has left the plateau at the first epoch whose training loss is under
--plateau-loss (chance is ln 10 = 2.303). The pick (best mean validation accuracy at the last epoch, among
settings the lecture does not contradict: its code shows Keras' default initialisation) is then trained on
all 1,000 images of --final-trials trials and scored on the 10,000 test images. The diagnostic per setting:
the spread of the last hidden layer's outputs across images at initialisation, which sigmoid's slope of at
most 1/4 shrinks layer by layer. Figures in benchmarks/results/sigmoid_plateau.json, plot beside it.

    python benchmarks/sigmoid_plateau.py [--trials 5] [--epochs 100] [--settings 32:1e-3:glorot,256:1e-3:glorot]
        [--final-trials 5] [--test-sample 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, figure_row, save_figure, write_results  # noqa: E402

log = logging.getLogger("sigmoid_plateau")

TRAIN = "cifar10:small?per_class=100&seed={seed}"
TEST = "cifar10:test"
LECTURE = (37.3, 38.5)
DEFAULT = "32:1e-3:glorot"   # the row as it stands: batch 32, Adam at Keras' default rate, Keras' default init
# initialisation -> scale of Keras' VarianceScaling (fan_avg, uniform): "glorot" is Keras' default
# (glorot_uniform); "glorot4" is 4x its interval, Glorot and Bengio's advice for sigmoid units (slope 1/4)
INITS = {"glorot": 1.0, "glorot4": 16.0}


def parse_setting(text: str) -> tuple[int, float, str]:
    batch, rate, init = text.split(":")
    if init not in INITS:
        raise SystemExit(f"unknown initialisation {init!r}; known: {', '.join(INITS)}")
    return int(batch), float(rate), init


def build(init: str, seed: int):
    """The lecture's sigmoid CNN (classifiers.classic.cifar_cnn), its kernels drawn by `init` with `seed`."""
    import keras

    from classifiers.classic import cifar_cnn

    keras.utils.set_random_seed(seed)
    model = cifar_cnn("sigmoid")
    if init != "glorot":
        for layer in model.layers:
            if hasattr(layer, "kernel"):
                fan_in, fan_out = math.prod(layer.kernel.shape[:-1]), layer.kernel.shape[-1]
                if len(layer.kernel.shape) == 4:   # a convolution's fans count its receptive field, as Keras does
                    fan_out *= math.prod(layer.kernel.shape[:2])
                limit = math.sqrt(3 * INITS[init] / ((fan_in + fan_out) / 2))
                layer.kernel.assign(keras.random.uniform(layer.kernel.shape, -limit, limit, seed=seed))
    return model


def feature_spread(model, x) -> float:
    """Mean over units of the standard deviation across images of the Flatten output: the image-dependent
    signal the softmax layer sees."""
    import keras
    import numpy as np

    flatten = next(layer for layer in model.layers if isinstance(layer, keras.layers.Flatten))
    features = keras.Model(model.inputs, flatten.output)(x[:256]).numpy()
    return float(np.std(features, axis=0).mean())


def train(x, y, seed: int, batch_size: int, rate: float, init: str, epochs: int, validation=None):
    """One trial: history (loss, accuracy, val_accuracy per epoch), the model, the spread at initialisation."""
    import keras

    model = build(init, seed)
    spread = feature_spread(model, x)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                  optimizer=keras.optimizers.Adam(learning_rate=rate), metrics=["accuracy"])
    progress = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: log.info(
        "  epoch %d: loss %.4f, validation accuracy %s", epoch + 1, logs["loss"], logs.get("val_accuracy")))
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, validation_data=validation,
                        callbacks=[progress])
    return {k: [round(float(v), 4) for v in values] for k, values in history.history.items()}, model, spread


def left_plateau(losses: list[float], threshold: float) -> int | None:
    """The first epoch (1-based) whose training loss is under `threshold`, or None."""
    return next((epoch + 1 for epoch, loss in enumerate(losses) if loss < threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per setting (default 5)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--settings", default="32:1e-3:glorot,256:1e-3:glorot,32:1e-3:glorot4",
                        help="comma-separated batch:learning-rate:init; init one of " + ", ".join(INITS))
    parser.add_argument("--plateau-loss", type=float, default=2.2)
    parser.add_argument("--final-trials", type=int, default=5, help="trials of the pick on all images (0: none)")
    parser.add_argument("--final-epochs", type=int, default=0, help="epochs of the final trials (0: --epochs)")
    parser.add_argument("--out", default="sigmoid_plateau", help="results name under benchmarks/results/")
    parser.add_argument("--combine", default=None, help="comma-separated results names: their settings in one "
                        "results file (--out) and plot, nothing trained")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.combine:
        combine(args.combine.split(","), args.out)
        return

    import numpy as np

    from classifiers.sweeps import validation_split
    from extractor.datasets import open_dataset

    def pixels(spec):
        x, y = open_dataset(spec).arrays()
        return x.astype(np.float32) / np.float32(255), y

    settings = [parse_setting(s) for s in args.settings.split(",")]
    data = [pixels(TRAIN.format(seed=t)) for t in range(max(args.trials, args.final_trials))]
    results, started = [], time.perf_counter()
    for batch_size, rate, init in settings:
        trials = []
        for t in range(args.trials):
            x, y = data[t]
            (fit,), (held,) = validation_split(y[None], [t], 0.2)
            start = time.perf_counter()
            history, _, spread = train(x[fit], y[fit], t, batch_size, rate, init, args.epochs, (x[held], y[held]))
            trials.append({"seed": t, "history": history, "feature_spread_at_init": round(spread, 6),
                           "left_plateau_at_epoch": left_plateau(history["loss"], args.plateau_loss),
                           "seconds": round(time.perf_counter() - start, 1)})
            log.info("batch %d lr %g %s trial %d: left the plateau at epoch %s; validation %.1f%% at the end, "
                     "spread %.2g (%.0f s)", batch_size, rate, init, t, trials[-1]["left_plateau_at_epoch"],
                     100 * history["val_accuracy"][-1], spread, trials[-1]["seconds"])
        results.append({"batch_size": batch_size, "learning_rate": rate, "init": init, "trials": trials,
                        "validation_at_end_mean": round(float(np.mean([t["history"]["val_accuracy"][-1]
                                                                       for t in trials])), 4),
                        "left_plateau": sum(t["left_plateau_at_epoch"] is not None for t in trials)})
    sweep_seconds = time.perf_counter() - started

    allowed = [r for r in results if r["init"] == "glorot"]
    pick = max(allowed, key=lambda r: r["validation_at_end_mean"]) if allowed else None
    final = None
    if pick and args.final_trials:
        x_test, y_test = pixels(TEST)
        epochs = args.final_epochs or args.epochs
        accuracies, seconds = [], []
        for t in range(args.final_trials):
            start = time.perf_counter()
            history, model, _ = train(*data[t], t, pick["batch_size"], pick["learning_rate"], pick["init"], epochs)
            accuracies.append(float(model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1]))
            seconds.append(round(time.perf_counter() - start, 1))
            log.info("final trial %d: test %.1f%%", t, 100 * accuracies[-1])
        final = {"setting": {k: pick[k] for k in ("batch_size", "learning_rate", "init")}, "epochs": epochs,
                 "accuracies": [round(a, 4) for a in accuracies], "mean": round(float(np.mean(accuracies)), 4),
                 "min": round(min(accuracies), 4), "max": round(max(accuracies), 4), "seconds": seconds}

    out = {"lecture": list(LECTURE), "default": DEFAULT, "epochs": args.epochs, "plateau_loss": args.plateau_loss,
           "chance_loss": round(math.log(10), 4), "validation_fraction": 0.2, "settings": results,
           "pick": final, "sweep_seconds": round(sweep_seconds, 1),
           "command": " ".join(["python", "benchmarks/sigmoid_plateau.py", *sys.argv[1:]])}
    path = write_results(args.out, out)
    plot(out, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")


def combine(names: list[str], out: str) -> None:
    """Several runs' settings (each run one or more settings) in one results file and plot."""
    import json

    runs = [json.loads((RESULTS / f"{name}.json").read_text()) for name in names]
    combined = {**{k: v for k, v in runs[0].items() if k not in ("settings", "epochs", "command", "environment")},
                "settings": [{**s, "epochs": run["epochs"], "from": name, "command": run["command"]}
                             for name, run in zip(names, runs) for s in run["settings"]],
                "command": " ".join(["python", "benchmarks/sigmoid_plateau.py", *sys.argv[1:]])}
    path = write_results(out, combined)
    plot(combined, RESULTS / f"{out}.png")
    print(f"wrote {path} and {RESULTS / (out + '.png')}")


def plot(results: dict, path: Path) -> None:
    """Training loss and validation accuracy per epoch, every trial of every setting, one colour a setting."""
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = figure_row(2, (14, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, setting in enumerate(results["settings"]):
        label = (f"batch {setting['batch_size']}, lr {setting['learning_rate']:g}, {setting['init']}: "
                 f"{setting['left_plateau']}/{len(setting['trials'])} left")
        for j, trial in enumerate(setting["trials"]):
            epochs = range(1, len(trial["history"]["loss"]) + 1)
            kwargs = {"color": colours[i % len(colours)], "alpha": 0.7, "label": label if j == 0 else None}
            loss_axis.plot(epochs, trial["history"]["loss"], **kwargs)
            accuracy_axis.plot(epochs, [100 * v for v in trial["history"]["val_accuracy"]], **kwargs)
    loss_axis.axhline(results["chance_loss"], color="grey", linestyle=":", label="chance (ln 10)")
    loss_axis.set(title="training loss", xlabel="epochs", ylabel="sparse categorical cross-entropy")
    accuracy_axis.axhspan(*results["lecture"], color="green", alpha=0.15, label="lecture's test range")
    accuracy_axis.set(title="validation accuracy (20% of each trial's 1,000 images)", xlabel="epochs",
                      ylabel="accuracy (%)")
    save_figure(figure, (loss_axis, accuracy_axis), "cifar_vgg: the sigmoid CNN from scratch, Adam; each line a trial",
                path)


if __name__ == "__main__":
    main()
