"""Keras heads on cached features as scikit-learn classifiers, with every random choice fixed by one seed.

Given the integer seed `s` behind `random_state` (see `resolve_seed`), training is a pure function of
the data, and the fast trainer (`classifiers.trainer`) reproduces it step for step:

* Initial weights: `rng = numpy.random.default_rng([s, 0])`; for each Dense layer in order, kernel
  `rng.uniform(-l, l, (fan_in, fan_out))` cast to float32 with `l = sqrt(6 / (fan_in + fan_out))`
  (Glorot uniform, as Keras), bias zeros.
* Order of examples: `rng = numpy.random.default_rng([s, 1])`; epoch e visits rows
  `rng.permutation(n)` (the e-th draw) in batches of `batch_size`, the last one partial.
* Dropout: the head's layers are numbered from 0 in order; at optimizer step t (0-based, counting
  batches over all epochs) the unit k of batch row r of a layer of width w and index i is kept iff
  `scramble(key ^ (r * w + k)) >> 40 >= ceil(rate * 2**24)`, where
  `key = scramble(scramble(scramble(s) ^ i) ^ t)` and `scramble(z)` is splitmix64's finaliser of
  `z + 0x9E3779B97F4A7C15` in wrapping uint64 arithmetic. Kept values are multiplied by
  `float32(1 / (1 - rate))`, dropped ones are 0; at inference dropout is the identity.
* Loss: sparse categorical cross-entropy of the softmax logits, mean over the batch; optimizer Adam
  (Keras' update: `m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)`,
  `w -= m * lr sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)`, all float32, t from 1).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from extractor.labels import class_indices

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class HeadSpec:
    """The layers of a head: [Dropout(input_dropout)] [Dense(hidden_units, tanh) [Dropout(hidden_dropout)]]
    Dense(n_classes, softmax); a rate of 0 or 0 hidden units leaves that layer out."""

    input_dropout: float = 0.0
    hidden_units: int = 0
    hidden_dropout: float = 0.0

    def dropout_indices(self) -> tuple[int, int]:
        """Layer indices (see the module docstring) of the input and the hidden dropout."""
        first = 1 if self.input_dropout else 0
        return 0, first + 1


HEAD_SPECS: dict[str, HeadSpec] = {
    "linear": HeadSpec(),
    "dropout-linear": HeadSpec(input_dropout=0.5),
    "mnist-cnn": HeadSpec(input_dropout=0.5),
    "mlp512-tanh-dropout": HeadSpec(hidden_units=512, hidden_dropout=0.5),
    "dropout-mlp512-tanh-dropout": HeadSpec(input_dropout=0.5, hidden_units=512, hidden_dropout=0.5),
    "mlp512-tanh": HeadSpec(hidden_units=512),
}


def accuracy(head, X: np.ndarray, y: np.ndarray) -> float:
    """The share of `X` that a trained head (anything with `predict`) labels as `y`."""
    return float(np.mean(head.predict(X) == y))


def head_spec(name: str) -> HeadSpec:
    """The `HeadSpec` called `name`; ValueError listing the known names otherwise."""
    try:
        return HEAD_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown head spec {name!r}; known: {', '.join(sorted(HEAD_SPECS))}") from None


def resolve_seed(random_state) -> int:
    """The integer seed behind `random_state`: an int as it is; None or a RandomState draws one."""
    if isinstance(random_state, numbers.Integral):
        check_random_state(random_state)  # rejects negative and over-2**32 seeds
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def initial_weights(spec: HeadSpec, n_features: int, n_classes: int, seed: int) -> list[np.ndarray]:
    """Glorot-uniform kernels and zero biases, as [kernel (fan_in, fan_out), bias (fan_out,)] per Dense layer."""
    rng = np.random.default_rng([seed, 0])
    widths = [n_features] + ([spec.hidden_units] if spec.hidden_units else []) + [n_classes]
    weights = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        weights += [rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32), np.zeros(fan_out, np.float32)]
    return weights


def epoch_permutations(seed: int, n: int, epochs: int) -> np.ndarray:
    """(epochs, n) int64: the order in which each epoch visits the n training rows."""
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.permutation(n) for _ in range(epochs)]) if epochs else np.zeros((0, n), np.int64)


def head_layers(spec_name: str, n_classes: int, dropout=None) -> list:
    """The head's Keras layers, unbuilt: [Dropout] [Dense(hidden, tanh) [Dropout]] Dense(n_classes, softmax), as the
    spec says. `dropout(rate, index)` makes each dropout layer, `index` its number in the module docstring's
    scheme; by default Keras' own `Dropout`, the lecture's (and, like every dropout, the identity at inference).
    The one description of a head's layers: the classic end-to-end model, the trained head and the saved one."""
    import keras

    spec = head_spec(spec_name)
    make_dropout = dropout or (lambda rate, index: keras.layers.Dropout(rate))
    input_index, hidden_index = spec.dropout_indices()
    layers = [make_dropout(spec.input_dropout, input_index)] if spec.input_dropout else []
    if spec.hidden_units:
        layers.append(keras.layers.Dense(spec.hidden_units, activation="tanh"))
        if spec.hidden_dropout:
            layers.append(make_dropout(spec.hidden_dropout, hidden_index))
    return layers + [keras.layers.Dense(n_classes, activation="softmax")]


def _set_dense_weights(layers: list, n_features: int, weights: list[np.ndarray]) -> None:
    """Build the Dense layers of `layers` for inputs of width `n_features` and give them `weights`
    ([kernel (fan_in, fan_out), bias (fan_out,)] per Dense layer, in order)."""
    import keras

    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    if len(weights) != 2 * len(dense):
        raise ValueError(f"a head of {len(dense)} Dense layers needs {2 * len(dense)} weight arrays; "
                         f"got {len(weights)}")
    width = n_features
    for i, layer in enumerate(dense):
        layer.build((None, width))
        layer.set_weights(weights[2 * i:2 * i + 2])
        width = layer.units


def build_head_layers(spec_name: str, n_features: int, n_classes: int, seed: int) -> list:
    """The head's layers for training, built, holding `initial_weights`, their dropout seeded (`StepDropout`);
    the same for cached features and end to end."""
    from classifiers.keras_training import StepDropout

    layers = head_layers(spec_name, n_classes, lambda rate, index: StepDropout(rate, seed, index))
    _set_dense_weights(layers, n_features, initial_weights(head_spec(spec_name), n_features, n_classes, seed))
    return layers


def inference_model(spec_name: str, weights: list[np.ndarray]):
    """The fitted head for prediction, in stock Keras layers: saved, `keras.models.load_model` opens it in a
    process that never imported this project. Its dropout is Keras' own, the identity at inference as
    `StepDropout` is. `weights`: [kernel (fan_in, fan_out), bias (fan_out,)] per Dense layer, in order."""
    import keras

    layers = head_layers(spec_name, weights[-1].shape[0])
    _set_dense_weights(layers, weights[0].shape[0], weights)
    return keras.Sequential([keras.Input((weights[0].shape[0],)), *layers])


def fit_in_order(model, x, y: np.ndarray, *, seed: int, epochs: int, batch_size: int, validation_data=None,
                 verbose: int = 0) -> dict[str, list[float]]:
    """`model.fit` visiting the examples in the order `epoch_permutations(seed, ...)`; returns the history.

    x: (n, ...) inputs (features or images), y: (n,) int class indices. The model must be compiled.
    """
    from classifiers.keras_training import ordered_batches

    batches = ordered_batches(x, y, epoch_permutations(seed, len(x), epochs), batch_size)
    history = model.fit(batches, epochs=epochs, steps_per_epoch=-(-len(x) // batch_size),
                        validation_data=validation_data, validation_batch_size=batch_size, shuffle=False,
                        verbose=verbose)
    return {key: [float(v) for v in history.history[key]] for key in HISTORY_KEYS if key in history.history}


class KerasHead(ClassifierMixin, BaseEstimator):
    """A head from `HEAD_SPECS` trained with Keras on feature vectors, reproducibly from `random_state`.

    Parameters are the lecture's: `epochs`, `batch_size`, `optimizer` (a Keras optimizer name; Adam's
    defaults unless `learning_rate` is given).
    """

    def __init__(self, spec: str = "linear", epochs: int = 100, batch_size: int = 4, optimizer: str = "adam",
                 learning_rate: float | None = None, random_state=None, verbose: int = 0):
        self.spec = spec
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.random_state = random_state
        self.verbose = verbose

    def _make_optimizer(self):
        import keras

        config = {} if self.learning_rate is None else {"learning_rate": float(self.learning_rate)}
        try:
            return keras.optimizers.get({"class_name": self.optimizer, "config": config})
        except ValueError:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use a Keras optimizer name like 'adam'") from None

    def fit(self, X, y, validation_data=None) -> KerasHead:
        """Train on X (n, d) and labels y (n,); validation_data (X_val, y_val) adds val_* to `history_`."""
        head_spec(self.spec)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_index = class_indices(y)
        if validation_data is not None:
            validation_data = self._encode_validation(validation_data)
        seed = resolve_seed(self.random_state)

        import keras

        model = keras.Sequential(
            [keras.Input((self.n_features_in_,))]
            + build_head_layers(self.spec, self.n_features_in_, len(self.classes_), seed)
        )
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=self._make_optimizer(),
                      metrics=["accuracy"])
        self.history_ = fit_in_order(model, X, y_index.astype(np.int32), seed=seed, epochs=self.epochs,
                                     batch_size=self.batch_size, validation_data=validation_data,
                                     verbose=self.verbose)
        trained = [weight for layer in model.layers if layer.trainable_weights for weight in layer.get_weights()]
        self.model_ = inference_model(self.spec, trained)
        log.debug("trained %s head on %d examples", self.spec, len(X))
        return self

    def _encode_validation(self, validation_data) -> tuple[np.ndarray, np.ndarray]:
        """(X_val float32 (m, d), y_val as class indices (m,)); unknown labels are an error."""
        X_val, y_val = validation_data
        X_val = validate_data(self, X_val, reset=False, dtype=np.float32)
        _, index = class_indices(column_or_1d(y_val), self.classes_)
        return X_val, index.astype(np.int32)

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes) float32 class probabilities, columns in the order of `classes_`."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return np.asarray(self.model_(X, training=False))

    def predict(self, X) -> np.ndarray:
        """(n,) the most probable class label of each row of X."""
        probabilities = self.predict_proba(X)
        return self.classes_[np.argmax(probabilities, axis=1)]
