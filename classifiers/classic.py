"""The classic way, kept as the baseline: the lecture's Keras models trained end to end with `fit`.

Freeze-and-retrain runs the frozen backbone inside the model, so every batch of every epoch pays for
its forward pass; the from-scratch CNNs are the lecture's no-transfer rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from classifiers.heads import head_layers
from extractor.errors import InvalidInputError

WARMUP_STEPS = 5  # the first steps trace and allocate: left out of the steady-state step time


def cifar_cnn(activation: str, num_classes: int = 10, input_shape=(32, 32, 3)):
    """cifar_vgg.py's no-transfer CNN: two conv pairs with pooling, Flatten, Dropout 0.5, Dense softmax."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input(shape=input_shape),
        layers.Conv2D(32, kernel_size=(3, 3), activation=activation),
        layers.Conv2D(32, kernel_size=(3, 3), activation=activation),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation=activation),
        layers.Conv2D(64, kernel_size=(3, 3), activation=activation),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ])


def freeze_and_retrain_model(spec, head: str, num_classes: int):
    """`keras.Sequential([Input, frozen backbone, head])` for a Keras repository entry: the backbone is
    the very model the embeddings come from (same file, cut, pooling), not trainable.

    For tl_mnist's CNN cut after Flatten with the "mnist-cnn" head (Dropout 0.5 + Dense) this is the
    lecture's `model.layers[0:num_layers-1] + [Dense]`; for VGG16 it is the lecture's frozen convolutional
    base + Flatten + head.
    """
    import keras

    from extractor import paths
    from extractor.models.runtimes.keras_model import cut_model

    if spec.runtime != "keras":
        raise InvalidInputError(f"the classic baseline trains Keras models end to end; {spec.name} runs on "
                                f"{spec.runtime}")
    frozen = cut_model(spec, str(paths.verified_file(spec.path, spec.sha256)))
    return keras.Sequential([keras.Input(shape=spec.input_shape), frozen] + head_layers(head, num_classes))


@dataclass
class ClassicRun:
    accuracy: float           # test accuracy after the last epoch (NaN for a timing-only run)
    seconds: float            # training (fit) wall time, per-epoch validation included (timing-only: epochs x
                              # seconds_per_epoch)
    epochs: int
    seconds_per_epoch: float  # timing-only: see `steady_epoch_seconds`
    history: dict
    warmup_seconds: float = 0.0             # timing-only: what the first steps cost beyond the steady speed
    seconds_per_epoch_range: tuple = ()     # timing-only: from the 10th and 90th percentile step times
    # Timing-only, what `steady_epoch_seconds` pools over several builds:
    steps_per_epoch: int = 0
    step_seconds: list = field(default_factory=list)              # the steady-state training steps
    between_steps_seconds: float = 0.0                            # what fit spends in an epoch between steps
    validation_batches: int = 0                                   # the test set's batches per epoch
    validation_batch_seconds: list = field(default_factory=list)  # steady-state validation batches


# Keras' steps on this machine run in episodes of two speeds, 1.7-1.8x apart: for seconds at a time both
# intra-op threads stay busy while the steps take as long as on one thread (measured: 19 vs 34 ms a step of
# mnist_vgg's model, 5-60% of the steps of a minute, in every build; with one thread, or with numpy's two,
# no episodes). A median or a single timed pass lands in either; the lower quartile of many steps from
# several builds is the steady speed as long as three steps in four are not slow.
STEADY_QUANTILE = 25


def steady_epoch_seconds(runs: list[ClassicRun]) -> tuple[float, float, float]:
    """An epoch's seconds from timing-only runs, their steps pooled: the steps per epoch times the lower
    quartile of the steady-state steps, plus what fit spends between steps (median), plus the test set's
    validation batches times their lower quartile; also from the 10th and 90th percentiles (a range)."""
    steps = _pooled_steps(runs)
    validation = np.concatenate([r.validation_batch_seconds for r in runs])
    between = float(np.median([r.between_steps_seconds for r in runs]))

    def epoch(q: float) -> float:
        seconds = runs[0].steps_per_epoch * float(np.percentile(steps, q)) + between
        if len(validation):
            seconds += runs[0].validation_batches * float(np.percentile(validation, q))
        return seconds

    return epoch(STEADY_QUANTILE), epoch(10), epoch(90)


def slow_step_share(runs: list[ClassicRun], factor: float = 1.4) -> float:
    """The share of the pooled steady-state steps slower than `factor` x their lower quartile: the slow
    episodes' share, which `steady_epoch_seconds` stays right under while it is below three in four."""
    steps = _pooled_steps(runs)
    return float(np.mean(steps > factor * np.percentile(steps, STEADY_QUANTILE)))


def _pooled_steps(runs: list[ClassicRun]) -> np.ndarray:
    return np.concatenate([r.step_seconds for r in runs])


def _step_timer():
    """A Keras callback recording the wall time of every training and test step, and of every epoch less
    its steps."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.steps, self.test_steps, self.between_steps = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_started, self._epoch_steps = time.perf_counter(), len(self.steps)

        def on_train_batch_begin(self, batch, logs=None):
            self._started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(time.perf_counter() - self._started)

        def on_test_batch_begin(self, batch, logs=None):
            self._started = time.perf_counter()

        def on_test_batch_end(self, batch, logs=None):
            self.test_steps.append(time.perf_counter() - self._started)

        def on_epoch_end(self, epoch, logs=None):
            stepping = sum(self.steps[self._epoch_steps:])
            self.between_steps.append(max(time.perf_counter() - self._epoch_started - stepping, 0.0))

    return StepTimer()


def fit_classic(model, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, epochs: int,
                batch_size: int, seed: int, validate: bool = False, timing_only: bool = False,
                validation_sample: int = 1000) -> ClassicRun:
    """compile(adam, sparse CE) + fit as the lecture does (validating on the test set after every epoch
    if `validate`); test accuracy after the last epoch.

    `timing_only` measures the cost without paying it all, from steady-state steps: every training step
    is timed, the first few (tracing, first allocations) left out; so is every validation batch of
    `validation_sample` test images, after one untimed warm-up batch. An epoch's seconds come from them
    as `steady_epoch_seconds` says. The warm-up (the first steps' excess) is reported apart.
    """
    import keras

    keras.utils.set_random_seed(seed)
    steps_per_epoch = -(-len(x) // batch_size)
    # A run for its results takes a whole epoch per call into the compiled step (the same steps, weights
    # equal to the bit): no Python between steps, which cost a third of the CPU time of the MNIST CNN's
    # steps at batch 4. A timing run keeps one step per call, as the lecture's model runs, so that every
    # step is timed.
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer="adam", metrics=["accuracy"],
                  steps_per_execution=1 if timing_only else steps_per_epoch)
    timer = _step_timer()
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[timer],
                        validation_data=(x_test, y_test) if validate and not timing_only else None)
    seconds = time.perf_counter() - start
    history = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    if timing_only:
        steps = np.asarray(timer.steps)
        first = min(WARMUP_STEPS, len(steps) - 1)
        steady = steps[first:]
        validation_batches = 0
        if validate:
            sample = max(min(validation_sample, len(x_test)) // batch_size, 1) * batch_size
            model.evaluate(x_test[:batch_size], y_test[:batch_size], batch_size=batch_size, verbose=0)
            model.evaluate(x_test[:sample], y_test[:sample], batch_size=batch_size, verbose=0, callbacks=[timer])
            validation_batches = -(-len(x_test) // batch_size)
        warmup = float(steps[:first].sum() - first * np.percentile(steady, STEADY_QUANTILE))
        # seconds and seconds_per_epoch follow from the steps, below
        run = ClassicRun(float("nan"), 0.0, epochs, 0.0, history, round(max(warmup, 0.0), 3),
                         steps_per_epoch=steps_per_epoch, step_seconds=[round(float(s), 6) for s in steady],
                         between_steps_seconds=float(np.median(timer.between_steps)),
                         validation_batches=validation_batches,
                         validation_batch_seconds=[round(float(s), 6) for s in timer.test_steps])
        per_epoch, low, high = steady_epoch_seconds([run])
        run.seconds, run.seconds_per_epoch, run.seconds_per_epoch_range = per_epoch * epochs, per_epoch, (low, high)
        return run
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return ClassicRun(float(accuracy), seconds, epochs, seconds / epochs, history)
