"""Many trials of one head spec trained at once, step for step as `KerasHead` trains, in compiled loops.

Each trial runs the same steps as `KerasHead.fit` with `random_state=seed` (the formulas are in the
docstring of `classifiers.heads`): same initial weights, batches, dropout masks, loss and optimizer update
(Adam; RMSprop and SGD as Keras takes them at their defaults); results agree with Keras to float rounding (summation order). What makes it fast:

* one compiled loop per trial (numba, no Python per step); trials are spread over threads that run
  without the GIL, one trial per thread from start to end, so that its weights and Adam moments
  (about 3 MB for a 512x512 layer) stay in that core's caches;
* feature columns that are zero in every training example of a trial are left out: their gradient is
  exactly 0 at every step, so Adam never moves those weight rows (m and v stay 0) and they keep
  their initial values. The remaining weights and their Adam moments lie in three flat vectors, so
  that Adam on narrow layers (a linear head has 5 or 10 columns) runs over many rows per call;
* in training, products with zero inputs (ReLU features are ~3/4 zeros) are skipped;
* validation is a dense BLAS product (X_val @ w1), one BLAS thread per trial thread: on 512-wide
  layers it beats skipping the zeros in compiled loops, which is bound by reading w1's rows;
* tanh is TensorFlow's own rational approximation (Eigen's `ptanh_float`, bit for bit), which
  vectorises, unlike the C library's.

Adam is bound by memory, not by its square root and division: per step it reads and writes every
weight and both moments (12 bytes per weight, ~2 MB for a 321x512 layer, about a core's L2), which
takes as long as the exact sqrt and divide, so an approximate reciprocal square root gains nothing.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from classifiers.dropout import MIX_GOLDEN, MIX_MUL1, MIX_MUL2, dropout_threshold
from classifiers.heads import KerasHead, epoch_permutations, head_spec, initial_weights
from extractor.labels import class_indices

log = logging.getLogger(__name__)

_F = np.float32
ADAM_LEARNING_RATE = 0.001  # Keras' default
# optimizer name -> (code in the compiled loop, Keras' default learning rate); Keras' defaults otherwise
# (RMSprop: rho 0.9, epsilon 1e-7, no momentum; SGD: no momentum)
OPTIMIZERS = {"adam": (0, ADAM_LEARNING_RATE), "rmsprop": (1, 0.001), "sgd": (2, 0.01)}
_ONE_MINUS_BETA1, _ONE_MINUS_BETA2 = _F(1 - 0.9), _F(1 - 0.999)  # as Keras computes them, then float32
_BETA1, _BETA2 = _F(0.9), _F(0.999)
ADAM_EPSILON = 1e-7  # Keras' default (Keras 1 and early Keras 2 used 1e-8); RMSprop's too
_RHO, _ONE_MINUS_RHO = _F(0.9), _F(1 - 0.9)
_GOLDEN, _MUL1, _MUL2 = np.uint64(MIX_GOLDEN), np.uint64(MIX_MUL1), np.uint64(MIX_MUL2)
_S27, _S30, _S31, _S40 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(40)
# Eigen's ptanh_float without FMA, as TensorFlow's CPU kernels are built: clamp, then a [9/8] rational.
_TANH_CLAMP = _F(7.90738964080810547)
_TANH_P = (_F(1.394553628e-8), _F(2.102733560e-5), _F(3.520756727e-3), _F(1.340216100e-1))
_TANH_Q = (_F(8.015776984e-7), _F(3.326951409e-4), _F(2.597254514e-2), _F(4.673548340e-1), _F(1.0))
_LANES = 16  # partial sums per dot product, so that the sum vectorises without fast-math
_CHUNK = 512  # values per Adam call at least (several weight rows when rows are narrow)

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
def _adam(w, m, v, g, alpha, epsilon):
    """Keras' Adam update of the 1-d arrays w, m, v with gradient g (alpha has the bias corrections)."""
    for k in range(w.size):
        mk = m[k] + (g[k] - m[k]) * _ONE_MINUS_BETA1
        vk = v[k] + (g[k] * g[k] - v[k]) * _ONE_MINUS_BETA2
        m[k] = mk
        v[k] = vk
        w[k] -= (mk * alpha) / (np.sqrt(vk) + epsilon)


@_jit
def _update(w, m, v, g, alpha, optimizer, epsilon):
    """One optimizer step on the 1-d arrays w (moments m, v) with gradient g, as Keras takes it: Adam
    (alpha holds the bias corrections), RMSprop (`v = rho v + (1 - rho) g^2`, `w -= alpha g / sqrt(v + eps)`)
    or SGD (`w -= alpha g`)."""
    if optimizer == 0:
        _adam(w, m, v, g, alpha, epsilon)
    elif optimizer == 1:
        for k in range(w.size):
            vk = _RHO * v[k] + _ONE_MINUS_RHO * (g[k] * g[k])
            v[k] = vk
            w[k] -= (alpha * g[k]) / np.sqrt(vk + epsilon)
    else:
        for k in range(w.size):
            w[k] -= g[k] * alpha


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
def _tanh_in_place(z, bias):
    """z (m, f) = tanh(z + bias), bias (f,)."""
    for i in range(z.shape[0]):
        for k in range(z.shape[1]):
            z[i, k] = _tanh(z[i, k] + bias[k])


@_jit
def _mean_xent_accuracy(logits, labels):
    """(mean cross-entropy, accuracy) of the softmax of logits (m, c) against labels (m,)."""
    probabilities = np.empty(logits.shape[1], np.float32)
    loss, correct = 0.0, 0
    for i in range(labels.size):
        xent, hit = _softmax_xent(logits[i], labels[i], probabilities)
        loss += xent
        correct += hit
    return loss / labels.size, correct / labels.size


@_jit
def _train_epochs(x, active, y, permutations, first_epoch, end_epoch, batch_size, seed, optimizer, learning_rate,
                  epsilon, input_threshold, input_scale, input_index, hidden_threshold, hidden_scale, hidden_index,
                  d, width, params, m, v, history):
    """Train epochs [first_epoch, end_epoch) of one trial in place, Adam moments m, v beside `params`.

    params (P,) holds [w1 rows (a, f), b1 (f,)] and with a hidden layer [w2t (c, f), b2 (c,)] after
    them, where w1's rows are those of the trial's `active` columns (a of the d features) and f is
    `width`. x (n, a) holds the trial's examples restricted to those columns; permutations (epochs, n);
    a dropout threshold of 0 means no dropout; history (epochs, 2) gets loss and accuracy.
    """
    n, n_active = x.shape
    w1_size = n_active * width
    hidden = params.size > w1_size + width
    n_classes = (params.size - w1_size - width) // (width + 1) if hidden else width
    w1 = params[:w1_size].reshape((n_active, width))
    b1 = params[w1_size:w1_size + width]
    w2t = params[w1_size + width:params.size - n_classes].reshape((n_classes if hidden else 0, width))
    b2 = params[params.size - n_classes:]
    # w1's gradient and Adam go a few rows at a time: one pass over at least _CHUNK values per call
    chunk_rows = max(1, _CHUNK // width)
    gradient = np.empty(chunk_rows * width, np.float32)
    tail_gradient = np.empty(params.size - w1_size, np.float32)  # b1, w2t, b2 in params' order
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
    ones = np.ones(batch_size, np.float32)
    batch_rows = np.arange(max(batch_size, n_classes))
    probabilities = np.empty(n_classes, np.float32)
    partial = np.empty((n_classes, _LANES), np.float32)
    step = first_epoch * ((n + batch_size - 1) // batch_size)
    for epoch in range(first_epoch, end_epoch):
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            alpha = learning_rate * np.sqrt(_F(1) - _BETA2 ** _F(step + 1)) / (_F(1) - _BETA1 ** _F(step + 1)) \
                if optimizer == 0 else learning_rate
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
                        row_values[count], row_ids[count] = value, a
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
            # backward; every gradient is taken before Adam moves any weight
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
                    at = width + c * width
                    _sum_of_rows(tail_gradient[at:at + width], delta_out[:, c], h, batch_rows, rows)
                _sum_of_rows(tail_gradient[tail_gradient.size - n_classes:], ones, delta_out, batch_rows, rows)
            else:
                delta1[:rows] = delta_out[:rows]
            _sum_of_rows(tail_gradient[:width], ones, delta1, batch_rows, rows)
            for a0 in range(0, n_active, chunk_rows):
                a1 = min(a0 + chunk_rows, n_active)
                for a in range(a0, a1):
                    at = (a - a0) * width
                    _sum_of_rows(gradient[at:at + width], column_values[a], delta1, column_rows[a], column_count[a])
                _update(params[a0 * width:a1 * width], m[a0 * width:a1 * width], v[a0 * width:a1 * width],
                        gradient[:(a1 - a0) * width], alpha, optimizer, epsilon)
            _update(params[w1_size:], m[w1_size:], v[w1_size:], tail_gradient, alpha, optimizer, epsilon)
            step += 1
        history[epoch, 0] = loss_sum / n
        history[epoch, 1] = correct / n


def _logits(X: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """(m, c) float32 logits at inference of X (m, d) float32, weights in Keras order."""
    w1, b1, *rest = weights
    z = X @ w1  # dense BLAS: faster than skipping the zeros of sparse features in compiled loops
    if not rest:
        return z + b1
    _tanh_in_place(z, b1)
    return z @ rest[0] + rest[1]



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
        logits = _logits(np.asarray(X, np.float32), self.weights)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """(m,) the most probable class label of each row of X (m, d)."""
        return self.classes[np.argmax(self.predict_proba(X), axis=1)]

    def to_head(self) -> KerasHead:
        """A fitted `KerasHead` holding these weights, as `KerasHead(...).fit` would have left it."""
        from classifiers.heads import inference_model

        n_features = self.weights[0].shape[0]
        head = KerasHead(self.spec, epochs=self.params["epochs"], batch_size=self.params["batch_size"],
                         optimizer=self.params.get("optimizer", "adam"), learning_rate=self.params["learning_rate"],
                         random_state=self.seed)
        head.model_ = inference_model(self.spec, self.weights)
        head.classes_, head.n_features_in_, head.history_ = self.classes, n_features, self.history
        return head


def train_trials(spec: str, X_trials, y_trials, seeds, epochs: int, batch_size: int,
                 learning_rate: float | None = None, validation_data=None, validation_freq: int = 1,
                 n_jobs: int | None = None, optimizer: str = "adam",
                 epsilon: float = ADAM_EPSILON) -> list[TrialResult]:
    """Train one head per trial, each exactly as `KerasHead(spec, ..., random_state=seed).fit` would.

    X_trials (T, n, d) float features, y_trials (T, n) labels (every trial holding the same classes),
    seeds (T,) ints; validation_data (X_val (m, d), y_val (m,)) is evaluated after every
    `validation_freq`-th epoch, as Keras' `validation_freq`. n_jobs threads (default: all CPUs).
    optimizer: adam, rmsprop or sgd, at Keras' defaults (learning_rate None: Keras' default rate); epsilon:
    Adam's and RMSprop's.
    """
    layout = head_spec(spec)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    optimizer_code, default_rate = OPTIMIZERS[optimizer]
    X_trials = np.asarray(X_trials, np.float32)
    y_trials = np.asarray(y_trials)
    seeds = [int(s) for s in seeds]
    if X_trials.ndim != 3 or y_trials.shape != X_trials.shape[:2] or len(seeds) != len(X_trials):
        raise ValueError(f"expected X_trials (T, n, d), y_trials (T, n) and T seeds; got {X_trials.shape}, "
                         f"{y_trials.shape} and {len(seeds)} seeds")
    classes, _ = class_indices(y_trials)
    for t, labels in enumerate(y_trials):
        if not np.array_equal(np.unique(labels), classes):
            raise ValueError(f"trial {t} holds classes {np.unique(labels)}, not all of {classes}")
    n_trials, n, d = X_trials.shape
    if validation_data is not None:
        X_val = np.ascontiguousarray(validation_data[0], np.float32)
        _, y_val = class_indices(validation_data[1], classes)
    # without validation, all epochs in one call; with it, the epochs up to each evaluation
    epochs_per_call = validation_freq if validation_data is not None else max(epochs, 1)
    input_index, hidden_index = layout.dropout_indices()

    def run(t: int) -> TrialResult:
        X, seed = X_trials[t], seeds[t]
        active = np.flatnonzero(X.any(axis=0))
        weights = initial_weights(layout, d, len(classes), seed)
        w1, b1, *rest = weights
        width = w1.shape[1]
        params = np.concatenate([w1[active].ravel(), b1] + ([rest[0].T.ravel(), rest[1]] if rest else []))
        m, v = np.zeros_like(params), np.zeros_like(params)

        def unpack() -> None:
            """Write params into `weights` (Keras order; inactive rows of w1 keep their initial values)."""
            w1[active] = params[:active.size * width].reshape(active.size, width)
            tail = params[active.size * width:]
            b1[:] = tail[:width]
            if rest:
                rest[0][:] = tail[width:width + rest[0].size].reshape(-1, width).T
                rest[1][:] = tail[width + rest[0].size:]

        x, y = np.ascontiguousarray(X[:, active]), class_indices(y_trials[t], classes)[1]
        permutations = epoch_permutations(seed, n, epochs)
        history = np.zeros((epochs, 2))  # loss, accuracy
        scores = np.full((epochs, 2), np.nan)  # val_loss, val_accuracy
        for first in range(0, epochs, epochs_per_call):
            end = min(first + epochs_per_call, epochs)
            _train_epochs(
                x, active, y, permutations, first, end, batch_size, seed, optimizer_code,
                _F(default_rate if learning_rate is None else learning_rate), _F(epsilon),
                np.uint64(dropout_threshold(layout.input_dropout) if layout.input_dropout else 0),
                _F(1 / (1 - layout.input_dropout)), input_index,
                np.uint64(dropout_threshold(layout.hidden_dropout) if layout.hidden_dropout else 0),
                _F(1 / (1 - layout.hidden_dropout)), hidden_index,
                d, width, params, m, v, history,
            )
            if validation_data is not None and end % validation_freq == 0:
                unpack()
                scores[end - 1] = _mean_xent_accuracy(_logits(X_val, weights), y_val)
        unpack()
        columns = {"loss": history[:, 0], "accuracy": history[:, 1]}
        if validation_data is not None:
            columns |= {"val_loss": scores[:, 0], "val_accuracy": scores[:, 1]}
        return TrialResult(
            spec, seed, classes, weights,
            {name: [float(v) for v in values if not np.isnan(v)] for name, values in columns.items()},
            {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "n_examples": n,
             "optimizer": optimizer, "epsilon": epsilon},
        )

    workers = max(1, min(n_jobs or len(os.sched_getaffinity(0)), n_trials))
    # trials are the parallel unit: each validation product runs on its own thread's core
    with threadpool_limits(max(1, len(os.sched_getaffinity(0)) // workers), user_api="blas"), \
            ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, range(n_trials)))
    log.debug("trained %d trials of %s on %d examples each", n_trials, spec, n)
    return results
