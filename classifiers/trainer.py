"""Many trials of one head spec trained at once, step for step as `KerasHead` trains, in compiled loops.

Each trial runs the same steps as `KerasHead.fit` with `random_state=seed` (the formulas are in the
docstring of `classifiers.heads`): same initial weights, batches, dropout masks, loss and Adam update;
results agree with Keras to float rounding (summation order). What makes it fast:

* one compiled loop per trial (numba, no Python per step); trials are spread over threads that run
  without the GIL, one trial per thread from start to end, so that its weights and Adam moments
  (about 3 MB for a 512x512 layer) stay in that core's caches;
* feature columns that are zero in every training example of a trial are left out: their gradient is
  exactly 0 at every step, so Adam never moves those weight rows (m and v stay 0) and they keep
  their initial values;
* products with zero inputs (ReLU features are ~3/4 zeros) are skipped, in training and validation;
* tanh is TensorFlow's own rational approximation (Eigen's `ptanh_float`, bit for bit), which
  vectorises, unlike the C library's.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from classifiers.heads import (
    MIX_GOLDEN,
    MIX_MUL1,
    MIX_MUL2,
    KerasHead,
    dropout_threshold,
    epoch_permutations,
    head_spec,
    initial_weights,
)

log = logging.getLogger(__name__)

_F = np.float32
ADAM_LEARNING_RATE = 0.001  # Keras' default
_ONE_MINUS_BETA1, _ONE_MINUS_BETA2 = _F(1 - 0.9), _F(1 - 0.999)  # as Keras computes them, then float32
_BETA1, _BETA2, _EPSILON = _F(0.9), _F(0.999), _F(1e-7)
_GOLDEN, _MUL1, _MUL2 = np.uint64(MIX_GOLDEN), np.uint64(MIX_MUL1), np.uint64(MIX_MUL2)
_S27, _S30, _S31, _S40 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(40)
# Eigen's ptanh_float without FMA, as TensorFlow's CPU kernels are built: clamp, then a [9/8] rational.
_TANH_CLAMP = _F(7.90738964080810547)
_TANH_P = (_F(1.394553628e-8), _F(2.102733560e-5), _F(3.520756727e-3), _F(1.340216100e-1))
_TANH_Q = (_F(8.015776984e-7), _F(3.326951409e-4), _F(2.597254514e-2), _F(4.673548340e-1), _F(1.0))
_LANES = 16  # partial sums per dot product, so that the sum vectorises without fast-math

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _scramble(z):
    z = z + _GOLDEN
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@_jit
def _dropout_key(seed, layer, step):
    return _scramble(_scramble(_scramble(np.uint64(seed)) ^ np.uint64(layer)) ^ np.uint64(step))


@_jit
def _tanh(a):
    x = min(max(a, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = x * x
    p = _TANH_P[0] * x2 + _TANH_P[1]
    p = p * x2 + _TANH_P[2]
    p = p * x2 + _TANH_P[3]
    q = _TANH_Q[0] * x2 + _TANH_Q[1]
    q = q * x2 + _TANH_Q[2]
    q = q * x2 + _TANH_Q[3]
    q = q * x2 + _TANH_Q[4]
    return ((x2 * x) * p + x) / q


@_jit
def _adam(w, m, v, g, alpha):
    """Keras' Adam update of the 1-d arrays w, m, v with gradient g (alpha has the bias corrections)."""
    for k in range(w.size):
        mk = m[k] + (g[k] - m[k]) * _ONE_MINUS_BETA1
        vk = v[k] + (g[k] * g[k] - v[k]) * _ONE_MINUS_BETA2
        m[k] = mk
        v[k] = vk
        w[k] -= (mk * alpha) / (np.sqrt(vk) + _EPSILON)


@_jit
def _sum_of_rows(out, coefficients, matrix, ids, count):
    """out (f,) = sum over i < count of coefficients[i] * matrix[ids[i]] (0 when count is 0).

    Four rows per pass over `out`, so that a pass does four multiply-adds per load and store of `out`;
    a short last group is padded with zero coefficients (adding 0 * x changes no sum).
    """
    width = out.size
    if count == 0:
        out[:] = 0
    for i0 in range(0, count, 4):
        r0 = matrix[ids[i0]]
        c0 = coefficients[i0]
        c1 = coefficients[i0 + 1] if i0 + 1 < count else _F(0)
        c2 = coefficients[i0 + 2] if i0 + 2 < count else _F(0)
        c3 = coefficients[i0 + 3] if i0 + 3 < count else _F(0)
        r1 = matrix[ids[i0 + 1]] if i0 + 1 < count else r0
        r2 = matrix[ids[i0 + 2]] if i0 + 2 < count else r0
        r3 = matrix[ids[i0 + 3]] if i0 + 3 < count else r0
        if i0 == 0:
            for k in range(width):
                out[k] = (c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k])
        else:
            for k in range(width):
                out[k] += (c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k])


@_jit
def _logits_from_hidden(h, w2t, b2, out, partial):
    """out (c,) = h (f,) @ w2t.T + b2, with w2t (c, f); `partial` (c, _LANES) is scratch."""
    n_classes, width = w2t.shape
    partial[:] = 0
    whole = width - width % _LANES
    for k0 in range(0, whole, _LANES):
        for c in range(n_classes):
            for lane in range(_LANES):
                partial[c, lane] += h[k0 + lane] * w2t[c, k0 + lane]
    for c in range(n_classes):
        total = _F(0)
        for lane in range(_LANES):
            total += partial[c, lane]
        for k in range(whole, width):
            total += h[k] * w2t[c, k]
        out[c] = total + b2[c]


@_jit
def _softmax_xent(logits, label, probabilities):
    """Writes softmax(logits) to `probabilities`; returns (cross-entropy, whether argmax == label)."""
    top, best = logits[0], 0
    for c in range(1, logits.size):
        if logits[c] > top:
            top, best = logits[c], c
    total = _F(0)
    for c in range(logits.size):
        probabilities[c] = np.exp(logits[c] - top)
        total += probabilities[c]
    for c in range(logits.size):
        probabilities[c] /= total
    return np.log(total) - (logits[label] - top), best == label


@_jit
def _sparse_logits(indptr, indices, values, w1, b1, w2t, b2, out):
    """out (m, c) = logits at inference of the rows of a CSR matrix (indptr, indices, values), width d.

    w1 (d, f), b1 (f,); with a hidden layer w2t (c, f), b2 (c,), else w2t has no rows and f == c.
    """
    width = w1.shape[1]
    hidden = w2t.shape[0] > 0
    z = np.empty(width, np.float32)
    partial = np.empty((max(w2t.shape[0], 1), _LANES), np.float32)
    for i in range(indptr.size - 1):
        start, end = indptr[i], indptr[i + 1]
        _sum_of_rows(z, values[start:end], w1, indices[start:end], end - start)
        for k in range(width):
            z[k] = z[k] + b1[k]
        if hidden:
            for k in range(width):
                z[k] = _tanh(z[k])
            _logits_from_hidden(z, w2t, b2, out[i], partial)
        else:
            out[i, :] = z


@_jit
def _evaluate(indptr, indices, values, labels, w1, b1, w2t, b2, logits):
    """(mean cross-entropy, accuracy) at inference on a CSR matrix; `logits` (m, c) is scratch."""
    _sparse_logits(indptr, indices, values, w1, b1, w2t, b2, logits)
    probabilities = np.empty(logits.shape[1], np.float32)
    loss, correct = 0.0, 0
    for i in range(labels.size):
        xent, hit = _softmax_xent(logits[i], labels[i], probabilities)
        loss += xent
        correct += hit
    return loss / labels.size, correct / labels.size


@_jit
def _train_trial(x, active, y, permutations, batch_size, seed, learning_rate, input_threshold, input_scale,
                 input_index, hidden_threshold, hidden_scale, hidden_index, w1, b1, w2t, b2,
                 val_indptr, val_indices, val_values, val_labels, validation_freq, history):
    """Train one trial in place: w1 (d, f), b1 (f,), w2t (c, f), b2 (c,) (w2t empty: no hidden layer).

    x (n, a) holds the trial's examples restricted to its `active` columns of the d features;
    permutations (epochs, n); a dropout threshold of 0 means no dropout; history (epochs, 4) gets
    loss, accuracy, val_loss, val_accuracy (NaN where not validated).
    """
    n, n_active = x.shape
    d, width = w1.shape
    hidden = w2t.shape[0] > 0
    n_classes = w2t.shape[0] if hidden else width
    m1, v1 = np.zeros_like(w1), np.zeros_like(w1)
    mb1, vb1 = np.zeros_like(b1), np.zeros_like(b1)
    m2, v2 = np.zeros_like(w2t), np.zeros_like(w2t)
    mb2, vb2 = np.zeros_like(b2), np.zeros_like(b2)
    column_values = np.empty((n_active, batch_size), np.float32)  # the batch's inputs after dropout, by column
    column_rows = np.empty((n_active, batch_size), np.int64)  # ... only the nonzero ones, and their rows
    column_count = np.empty(n_active, np.int64)
    row_values = np.empty(n_active, np.float32)
    row_ids = np.empty(n_active, np.int64)
    z = np.empty((batch_size, width), np.float32)  # layer-1 pre-activation, then tanh
    h = np.empty((batch_size, width), np.float32)  # tanh after dropout
    logits = np.empty((batch_size, n_classes), np.float32)
    delta_out = np.empty((batch_size, n_classes), np.float32)
    delta1 = np.empty((batch_size, width), np.float32)
    gradient = np.empty(width, np.float32)
    gradient2 = np.empty(n_classes, np.float32)
    ones = np.ones(batch_size, np.float32)
    batch_rows = np.arange(max(batch_size, n_classes))
    probabilities = np.empty(n_classes, np.float32)
    partial = np.empty((n_classes, _LANES), np.float32)
    val_logits = np.empty((val_labels.size, n_classes), np.float32)
    step = 0
    for epoch in range(permutations.shape[0]):
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            alpha = learning_rate * np.sqrt(_F(1) - _BETA2 ** _F(step + 1)) / (_F(1) - _BETA1 ** _F(step + 1))
            input_key = _dropout_key(seed, input_index, step)
            hidden_key = _dropout_key(seed, hidden_index, step)
            inverse_rows = _F(1) / _F(rows)
            column_count[:] = 0
            # forward
            for r in range(rows):
                example = permutations[epoch, start + r]
                count = 0
                for a in range(n_active):
                    value = x[example, a]
                    if value != 0 and input_threshold:
                        unit = np.uint64(r * d + active[a])
                        value = value * input_scale if _scramble(input_key ^ unit) >> _S40 >= input_threshold else _F(0)
                    if value != 0:
                        row_values[count], row_ids[count] = value, active[a]
                        count += 1
                        column_values[a, column_count[a]], column_rows[a, column_count[a]] = value, r
                        column_count[a] += 1
                _sum_of_rows(z[r], row_values, w1, row_ids, count)
                for k in range(width):
                    z[r, k] = z[r, k] + b1[k]
                if hidden:
                    base = np.uint64(r * width)
                    for k in range(width):
                        value = _tanh(z[r, k])
                        z[r, k] = value
                        if hidden_threshold:
                            keep = _scramble(hidden_key ^ (base + np.uint64(k))) >> _S40 >= hidden_threshold
                            value = value * hidden_scale if keep else _F(0)
                        h[r, k] = value
                    _logits_from_hidden(h[r], w2t, b2, logits[r], partial)
                else:
                    logits[r, :] = z[r]
                xent, hit = _softmax_xent(logits[r], y[example], probabilities)
                loss_sum += xent
                correct += hit
                for c in range(n_classes):
                    delta_out[r, c] = inverse_rows * (probabilities[c] - (_F(1) if c == y[example] else _F(0)))
            # backward, and Adam on each variable once its gradient is known
            if hidden:
                for r in range(rows):
                    _sum_of_rows(delta1[r], delta_out[r], w2t, batch_rows, n_classes)
                    base = np.uint64(r * width)
                    for k in range(width):
                        if hidden_threshold:
                            keep = _scramble(hidden_key ^ (base + np.uint64(k))) >> _S40 >= hidden_threshold
                            delta1[r, k] = delta1[r, k] * hidden_scale if keep else _F(0)
                        delta1[r, k] = delta1[r, k] * (_F(1) - z[r, k] * z[r, k])
                for c in range(n_classes):
                    _sum_of_rows(gradient, delta_out[:, c], h, batch_rows, rows)
                    _adam(w2t[c], m2[c], v2[c], gradient, alpha)
                _sum_of_rows(gradient2, ones, delta_out, batch_rows, rows)
                _adam(b2, mb2, vb2, gradient2, alpha)
            else:
                delta1[:rows] = delta_out[:rows]
            for a in range(n_active):
                _sum_of_rows(gradient, column_values[a], delta1, column_rows[a], column_count[a])
                j = active[a]
                _adam(w1[j], m1[j], v1[j], gradient, alpha)
            _sum_of_rows(gradient, ones, delta1, batch_rows, rows)
            _adam(b1, mb1, vb1, gradient, alpha)
            step += 1
        history[epoch, 0] = loss_sum / n
        history[epoch, 1] = correct / n
        if val_labels.size and (epoch + 1) % validation_freq == 0:
            history[epoch, 2], history[epoch, 3] = _evaluate(
                val_indptr, val_indices, val_values, val_labels, w1, b1, w2t, b2, val_logits
            )


def _csr(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values) of the nonzeros of X (m, d), row by row."""
    rows, columns = np.nonzero(X)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(X)))]).astype(np.int64)
    return indptr, columns.astype(np.int64), X[rows, columns].astype(np.float32)


def _class_indices(classes: np.ndarray, labels) -> np.ndarray:
    """(m,) int64 position of each label in the sorted `classes`; unknown labels are an error."""
    labels = np.asarray(labels).ravel()
    index = np.searchsorted(classes, labels).clip(0, len(classes) - 1)
    if not np.array_equal(classes[index], labels):
        raise ValueError(f"labels not among the training classes {classes}: {sorted(set(labels) - set(classes))}")
    return index.astype(np.int64)


@dataclass
class TrialResult:
    """One trained trial: the head's final weights in Keras order, its history, and how it was trained."""

    spec: str
    seed: int
    classes: np.ndarray
    weights: list[np.ndarray]  # [kernel (d, f), bias (f,)] per Dense layer
    history: dict[str, list[float]]
    params: dict = field(default_factory=dict)  # epochs, batch_size, learning_rate

    def predict_proba(self, X) -> np.ndarray:
        """(m, n_classes) float32 class probabilities at inference for X (m, d)."""
        X = np.asarray(X, np.float32)
        w1, b1, *rest = self.weights
        w2t, b2 = (rest[0].T.copy(), rest[1]) if rest else (np.zeros((0, w1.shape[1]), np.float32), b1[:0])
        logits = np.empty((len(X), len(self.classes)), np.float32)
        _sparse_logits(*_csr(X), w1, b1, w2t, b2, logits)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """(m,) the most probable class label of each row of X (m, d)."""
        return self.classes[np.argmax(self.predict_proba(X), axis=1)]

    def to_head(self) -> KerasHead:
        """A fitted `KerasHead` holding these weights, as `KerasHead(...).fit` would have left it."""
        import keras

        from classifiers.heads import build_head_layers
        from classifiers.keras_training import StepDropout

        n_features = self.weights[0].shape[0]
        head = KerasHead(self.spec, epochs=self.params["epochs"], batch_size=self.params["batch_size"],
                         learning_rate=self.params["learning_rate"], random_state=self.seed)
        head.model_ = keras.Sequential(
            [keras.Input((n_features,))] + build_head_layers(self.spec, n_features, len(self.classes), self.seed)
        )
        weights = iter(self.weights)
        steps = self.params["epochs"] * -(-self.params["n_examples"] // self.params["batch_size"])
        for layer in head.model_.layers:
            if isinstance(layer, StepDropout):
                layer.step.assign(steps)  # as many training calls as Keras' fit would have made
            else:
                layer.set_weights([next(weights), next(weights)])
        head.classes_, head.n_features_in_, head.history_ = self.classes, n_features, self.history
        return head


def train_trials(spec: str, X_trials, y_trials, seeds, epochs: int, batch_size: int,
                 learning_rate: float | None = None, validation_data=None, validation_freq: int = 1,
                 n_jobs: int | None = None) -> list[TrialResult]:
    """Train one head per trial, each exactly as `KerasHead(spec, ..., random_state=seed).fit` would.

    X_trials (T, n, d) float features, y_trials (T, n) labels (every trial holding the same classes),
    seeds (T,) ints; validation_data (X_val (m, d), y_val (m,)) is evaluated after every
    `validation_freq`-th epoch, as Keras' `validation_freq`. n_jobs threads (default: all CPUs).
    """
    layout = head_spec(spec)
    X_trials = np.asarray(X_trials, np.float32)
    y_trials = np.asarray(y_trials)
    seeds = [int(s) for s in seeds]
    if X_trials.ndim != 3 or y_trials.shape != X_trials.shape[:2] or len(seeds) != len(X_trials):
        raise ValueError(f"expected X_trials (T, n, d), y_trials (T, n) and T seeds; got {X_trials.shape}, "
                         f"{y_trials.shape} and {len(seeds)} seeds")
    classes = np.unique(y_trials)
    for t, labels in enumerate(y_trials):
        if not np.array_equal(np.unique(labels), classes):
            raise ValueError(f"trial {t} holds classes {np.unique(labels)}, not all of {classes}")
    n_trials, n, d = X_trials.shape
    if validation_data is None:
        val = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    else:
        val = (*_csr(np.asarray(validation_data[0], np.float32)), _class_indices(classes, validation_data[1]))
    input_index, hidden_index = layout.dropout_indices()

    def run(t: int) -> TrialResult:
        X, seed = X_trials[t], seeds[t]
        active = np.flatnonzero(X.any(axis=0))
        w1, b1, *rest = initial_weights(layout, d, len(classes), seed)
        w2t, b2 = (rest[0].T.copy(), rest[1]) if rest else (np.zeros((0, w1.shape[1]), np.float32), b1[:0].copy())
        history = np.full((epochs, 4), np.nan)
        _train_trial(
            np.ascontiguousarray(X[:, active]), active, _class_indices(classes, y_trials[t]),
            epoch_permutations(seed, n, epochs), batch_size, seed,
            _F(ADAM_LEARNING_RATE if learning_rate is None else learning_rate),
            np.uint64(dropout_threshold(layout.input_dropout) if layout.input_dropout else 0),
            _F(1 / (1 - layout.input_dropout)), input_index,
            np.uint64(dropout_threshold(layout.hidden_dropout) if layout.hidden_dropout else 0),
            _F(1 / (1 - layout.hidden_dropout)), hidden_index,
            w1, b1, w2t, b2, *val, validation_freq, history,
        )
        weights = [w1, b1] + ([w2t.T.copy(), b2] if rest else [])
        names = ["loss", "accuracy"] + (["val_loss", "val_accuracy"] if validation_data is not None else [])
        return TrialResult(
            spec, seed, classes, weights,
            {name: [float(v) for v in history[:, i] if not np.isnan(v)] for i, name in enumerate(names)},
            {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "n_examples": n},
        )

    with ThreadPoolExecutor(n_jobs or len(os.sched_getaffinity(0))) as pool:
        results = list(pool.map(run, range(n_trials)))
    log.debug("trained %d trials of %s on %d examples each", n_trials, spec, n)
    return results
