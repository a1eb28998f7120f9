"""Fine-tuning the last block of a backbone on cached activations: Chollet's two stages as one method.

The store holds the activations at an earlier cut (`vgg16_block4`: VGG16's block4_pool); the
remaining pretrained layers up to the backbone's own cut (block 5 and the flatten of `vgg16`) are
initialised from the pretrained weights and trained with the head on those activations:

1. the head alone, the block frozen: the block's output never changes, so it is computed once per
   trial and the head trains in the fast trainer (`train_trials`, the same steps as Keras);
2. the block unfrozen (BatchNormalization layers stay frozen, in inference mode) and trained with the
   head at a low learning rate, by Keras `fit`, on the activations instead of the pixels.

The classic way (`classic_fine_tuning`) trains the whole model on pixels, the layers below the cut
frozen, and takes the same steps: the same initial head weights, batch order (stage 2 continues the
seed's epoch permutations), dropout masks (the step counter of each dropout layer carries on from
stage 1) and Adam updates. Only the frozen layers' forward pass moves out of the training loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from classifiers.heads import build_head_layers, epoch_permutations
from extractor.errors import InvalidInputError
from extractor.labels import class_indices

log = logging.getLogger(__name__)

BLOCK_LEARNING_RATE = 1e-5  # Chollet's second stage: a low rate, so the pretrained filters move a little


@dataclass(frozen=True)
class FineTuning:
    """The two stages' settings: the head spec, epochs of each stage, batch size and learning rates
    (None: Adam's default, 0.001)."""

    head: str
    head_epochs: int
    block_epochs: int
    batch_size: int
    head_learning_rate: float | None = None
    block_learning_rate: float = BLOCK_LEARNING_RATE

    def __post_init__(self):
        for name in ("head_epochs", "block_epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'batch_size' else 'non-negative'} "
                                 f"integer; got {value!r}")
        if not self.block_learning_rate > 0:
            raise ValueError(f"block_learning_rate must be positive; got {self.block_learning_rate!r}")


@dataclass
class FineTunedTrial:
    """One trial's fine-tuned model (activations at the earlier cut -> class probabilities) and history."""

    seed: int
    classes: np.ndarray
    model: object                      # keras.Sequential([Input(activation shape), block, head layers])
    history: dict[str, list[float]]    # loss and accuracy per epoch, stage 1 then stage 2
    seconds: dict = field(default_factory=dict)  # block_forward, head, block per trial (shared ones split)

    def predict_proba(self, activations: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(m, n_classes) float32 for activations (m, D) flattened or (m, *activation shape)."""
        x = np.asarray(activations, np.float32).reshape((len(activations), *self.model.input_shape[1:]))
        return in_batches(self.model, x, batch_size)

    def predict(self, activations: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.predict_proba(activations), axis=1)]

    def weights(self) -> list[np.ndarray]:
        """Trainable weights after training, block first, in Keras order."""
        return [np.asarray(w) for w in self.model.trainable_weights]


def in_batches(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """model(x) at inference, called eagerly batch by batch: `predict` would trace a function per model."""
    if not len(x):
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])


def check_pairing(activations_spec, full_spec) -> None:
    """The two entries must be one model (same file, input, preprocessing), the first cut before the second."""
    same = ("runtime", "sha256", "input_size", "preprocessing", "channels")
    for name in same:
        if getattr(activations_spec, name) != getattr(full_spec, name):
            raise InvalidInputError(f"{activations_spec.name} and {full_spec.name} differ in {name}: fine-tuning "
                                    "needs two cuts of one model")
    if activations_spec.runtime != "keras" or activations_spec.config.architecture != full_spec.config.architecture:
        raise InvalidInputError(f"fine-tuning trains Keras layers; {full_spec.name} is not the same Keras model as "
                                f"{activations_spec.name}")


_whole_models: dict = {}  # fingerprint -> the entry's uncut model; blocks cut from it are copied before training


def _model_file(spec) -> str:
    """The entry's file, its sha256 checked first (`imagenet`: Keras' own download, checked by Keras)."""
    from extractor import paths

    return spec.path if spec.path == "imagenet" else str(paths.verified_file(spec.path, spec.sha256))


def _whole_model(spec):
    """The entry's uncut Keras model with its pretrained weights, loaded once per process (VGG16: seconds)."""
    from extractor.models.runtimes.keras_model import load_whole_model

    if spec.fingerprint not in _whole_models:
        _whole_models[spec.fingerprint] = load_whole_model(_model_file(spec), architecture=spec.config.architecture,
                                                           input_shape=spec.input_shape)
    return _whole_models[spec.fingerprint]


def remaining_block(activations_spec, full_spec):
    """The pretrained layers of `full_spec`'s model after `activations_spec`'s cut, up to `full_spec`'s cut
    and pooling, as a frozen Keras model: (n, *activation shape) -> (n, d)."""
    import keras

    from extractor.models.runtimes import check_cut, keras_pooling_layer

    check_pairing(activations_spec, full_spec)
    model = _whole_model(full_spec)
    names = [layer.name for layer in model.layers]
    for cut in (activations_spec.cut, full_spec.cut):
        check_cut(cut, names, full_spec.name)
    if names.index(activations_spec.cut) >= names.index(full_spec.cut):
        raise InvalidInputError(f"{activations_spec.name} is cut at {activations_spec.cut}, not before "
                                f"{full_spec.name}'s cut {full_spec.cut}")
    start, end = model.get_layer(activations_spec.cut).output, model.get_layer(full_spec.cut).output
    pooling = keras_pooling_layer(full_spec.pooling, len(end.shape))
    block = keras.Model(start, pooling(end) if pooling else end, name=f"{full_spec.name}_after_{activations_spec.cut}")
    block.trainable = False
    return block


def unfreeze(block) -> None:
    """Make the block trainable, except its BatchNormalization layers: frozen, they run in inference mode."""
    import keras

    block.trainable = True
    for layer in block._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _copy_of(block):
    """An independent block with the same (pretrained) weights, frozen."""
    import keras

    copy = keras.models.clone_model(block)
    copy.set_weights(block.get_weights())
    copy.trainable = False
    return copy


def _compile(model, learning_rate: float | None) -> None:
    import keras

    optimizer = keras.optimizers.Adam() if learning_rate is None else keras.optimizers.Adam(learning_rate)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=optimizer, metrics=["accuracy"])


def _fit_in_order(model, x: np.ndarray, y: np.ndarray, permutations: np.ndarray, batch_size: int,
                  epoch_seconds: list | None = None) -> dict[str, list[float]]:
    """`model.fit` over the epochs whose orders are `permutations` (e, n); per-epoch seconds appended."""
    import keras

    from classifiers.keras_training import ordered_batches

    if not len(permutations):
        return {"loss": [], "accuracy": []}

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if epoch_seconds is not None:
                epoch_seconds.append(time.perf_counter() - self.started)

    history = model.fit(ordered_batches(x, y, permutations, batch_size), epochs=len(permutations),
                        steps_per_epoch=-(-len(x) // batch_size), shuffle=False, verbose=0, callbacks=[EpochTimes()])
    return {key: [float(v) for v in history.history[key]] for key in ("loss", "accuracy")}


def _orders(seed: int, n: int, setup: FineTuning) -> tuple[np.ndarray, np.ndarray]:
    """Each stage's epoch orders: stage 2 continues the seed's permutations where stage 1 stopped."""
    orders = epoch_permutations(seed, n, setup.head_epochs + setup.block_epochs)
    return orders[:setup.head_epochs], orders[setup.head_epochs:]


def head_training_layers(spec: str, weights: list[np.ndarray], seed: int, steps: int) -> list:
    """The head's training layers (`build_head_layers`, seeded dropout) holding `weights` ([kernel, bias] per
    Dense layer), each dropout's step counter at `steps`, the optimizer steps taken so far: Keras' `fit`
    carries on with the masks that come next."""
    from classifiers.keras_training import StepDropout

    layers = build_head_layers(spec, weights[0].shape[0], weights[-1].shape[0], seed)
    values = iter(weights)
    for layer in layers:
        if isinstance(layer, StepDropout):
            layer.build(None)
            layer.step.assign(steps)
        else:
            layer.set_weights([next(values), next(values)])
    return layers


def train_block(block, head_layers: list, activations: np.ndarray, labels: np.ndarray, seed: int,
                setup: FineTuning, epoch_seconds: list | None = None):
    """Stage 2 of one trial: a copy of `block` (its pretrained weights), unfrozen, and the head's layers as
    stage 1 left them, trained at the block's learning rate on activations (n, *block input) with class
    indices (n,) int32, the epoch orders continuing the seed's. Returns (model, history)."""
    import keras

    tuned = _copy_of(block)
    model = keras.Sequential([keras.Input(tuple(block.input_shape[1:])), tuned] + list(head_layers))
    unfreeze(tuned)
    _compile(model, setup.block_learning_rate)
    _, block_orders = _orders(seed, len(activations), setup)
    return model, _fit_in_order(model, activations, labels, block_orders, setup.batch_size, epoch_seconds)


def fine_tune_trials(block, activations, y_trials, seeds, setup: FineTuning, n_jobs: int | None = None,
                     epoch_seconds: dict | None = None) -> list[FineTunedTrial]:
    """Both stages for every trial, on cached activations.

    activations (T, n, D) float32 (flattened or in the block's input shape), y_trials (T, n) labels, seeds
    (T,); `block` from `remaining_block` (copied per trial: it keeps its pretrained weights). Stage 1 runs all
    trials in the fast trainer (n_jobs threads); stage 2 one trial after another. `epoch_seconds`, when given,
    gets lists "block" (seconds per stage-2 epoch) and "head" (per stage-1 epoch, all trials together).
    """
    from classifiers.trainer import train_trials

    activations = np.asarray(activations, np.float32)
    y_trials = np.asarray(y_trials)
    if activations.ndim < 3 or y_trials.shape != activations.shape[:2] or len(seeds) != len(activations):
        raise ValueError(f"expected activations (T, n, ...), y_trials (T, n) and T seeds; got {activations.shape}, "
                         f"{y_trials.shape} and {len(seeds)} seeds")
    n_trials, n = activations.shape[:2]
    shape = tuple(block.input_shape[1:])
    if int(np.prod(activations.shape[2:])) != int(np.prod(shape)):
        raise InvalidInputError(f"activations of shape {activations.shape[2:]} do not fit the block's input {shape}")
    x_trials = activations.reshape((n_trials, n, *shape))
    start = time.perf_counter()
    features = np.stack([in_batches(block, x) for x in x_trials])
    forward_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stage1 = train_trials(setup.head, features, y_trials, seeds, setup.head_epochs, setup.batch_size,
                          learning_rate=setup.head_learning_rate, n_jobs=n_jobs)
    head_seconds = time.perf_counter() - start
    if epoch_seconds is not None and setup.head_epochs:
        epoch_seconds.setdefault("head", []).append(head_seconds / setup.head_epochs)
    trials = []
    for x, y, seed, head in zip(x_trials, y_trials, seeds, stage1):
        start = time.perf_counter()
        labels = class_indices(y, head.classes)[1].astype(np.int32)
        layers = head_training_layers(setup.head, head.weights, int(seed), setup.head_epochs * -(-n // setup.batch_size))
        model, history = train_block(block, layers, x, labels, int(seed), setup,
                                     None if epoch_seconds is None else epoch_seconds.setdefault("block", []))
        trials.append(FineTunedTrial(
            int(seed), head.classes, model,
            {key: head.history[key] + history[key] for key in ("loss", "accuracy")},
            {"block_forward": forward_seconds / n_trials, "head": head_seconds / n_trials,
             "block": time.perf_counter() - start}))
    log.debug("fine-tuned %d trials of %s on %d activations each", n_trials, setup.head, n)
    return trials


def classic_fine_tuning(activations_spec, full_spec, pixels: np.ndarray, y: np.ndarray, seed: int,
                        setup: FineTuning, epoch_seconds: dict | None = None):
    """The classic way, end to end on preprocessed pixels (n, S, S, C): the whole backbone and the head in
    one Keras model, the layers up to `activations_spec`'s cut frozen throughout; stage 1 trains the head
    (the block frozen), stage 2 the block and the head. Returns (model, classes, history)."""
    import keras

    from extractor.models.runtimes.keras_model import cut_model

    check_pairing(activations_spec, full_spec)
    backbone = cut_model(full_spec, _model_file(full_spec))
    classes, labels = class_indices(y)
    model = keras.Sequential([keras.Input(full_spec.input_shape), backbone]
                             + build_head_layers(setup.head, backbone.output_shape[-1], len(classes), seed))
    head_orders, block_orders = _orders(seed, len(pixels), setup)
    labels = labels.astype(np.int32)
    times = {} if epoch_seconds is None else epoch_seconds
    _compile(model, setup.head_learning_rate)
    history = _fit_in_order(model, pixels, labels, head_orders, setup.batch_size, times.setdefault("head", []))
    unfreeze(backbone)
    block_start = [layer.name for layer in backbone.layers].index(activations_spec.cut)
    for layer in backbone.layers[:block_start + 1]:
        layer.trainable = False
    _compile(model, setup.block_learning_rate)
    more = _fit_in_order(model, pixels, labels, block_orders, setup.batch_size, times.setdefault("block", []))
    return model, classes, {key: history[key] + more[key] for key in ("loss", "accuracy")}
