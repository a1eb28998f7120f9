"""The fast multi-trial trainer takes the same steps as KerasHead.fit, trial by trial."""

import numpy as np
import pytest
from sklearn.datasets import make_classification

from classifiers.heads import HEAD_SPECS, KerasHead
from classifiers.trainer import train_trials

SEEDS = [11, 12]


@pytest.fixture(scope="module")
def data():
    """Two trials of 30 sparse non-negative examples (batch 4: a partial last batch of 2), one dead column."""
    X, y = make_classification(n_samples=90, n_features=24, n_informative=6, n_classes=3, random_state=0)
    X = np.maximum(X, 0).astype(np.float32)
    X[:, 5] = 0
    labels = np.array([10, 20, 30])[y]
    return X[:60].reshape(2, 30, 24), labels[:60].reshape(2, 30), (X[60:], labels[60:])


@pytest.mark.parametrize("spec", sorted(set(HEAD_SPECS) - {"mnist-cnn"}))
def test_trials_equal_keras_heads(spec, data):
    X_trials, y_trials, validation = data
    results = train_trials(spec, X_trials, y_trials, SEEDS, epochs=3, batch_size=4, validation_data=validation)
    for X, y, seed, result in zip(X_trials, y_trials, SEEDS, results):
        head = KerasHead(spec, epochs=3, batch_size=4, random_state=seed).fit(X, y, validation_data=validation)
        keras_weights = [layer.get_weights() for layer in head.model_.layers if layer.trainable_weights]
        for expected, actual in zip(sum(keras_weights, []), result.weights, strict=True):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert sorted(result.history) == sorted(head.history_)
        for key, values in head.history_.items():
            np.testing.assert_allclose(result.history[key], values, rtol=1e-5, atol=1e-6)
        X_val = validation[0]
        np.testing.assert_array_equal(result.predict(X_val), head.predict(X_val))
        np.testing.assert_allclose(result.predict_proba(X_val), head.predict_proba(X_val), atol=1e-5)


@pytest.mark.parametrize("optimizer, learning_rate", [("rmsprop", None), ("sgd", 0.05), ("adam", 3e-4)])
@pytest.mark.parametrize("spec", ["linear", "dropout-mlp512-tanh-dropout"])
def test_other_optimizers_and_rates_equal_keras(spec, optimizer, learning_rate, data):
    X_trials, y_trials, _ = data
    (result,) = train_trials(spec, X_trials[:1], y_trials[:1], SEEDS[:1], epochs=3, batch_size=4,
                             learning_rate=learning_rate, optimizer=optimizer)
    head = KerasHead(spec, epochs=3, batch_size=4, optimizer=optimizer, learning_rate=learning_rate,
                     random_state=SEEDS[0]).fit(X_trials[0], y_trials[0])
    keras_weights = [np.asarray(w) for w in head.model_.trainable_weights]
    for expected, actual in zip(keras_weights, result.weights, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert result.to_head().get_params()["optimizer"] == optimizer


def test_unknown_optimizer_is_refused(data):
    X_trials, y_trials, _ = data
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'; known: adam, rmsprop, sgd"):
        train_trials("linear", X_trials, y_trials, SEEDS, epochs=1, batch_size=4, optimizer="adagrad")


def test_validation_freq_as_keras(data):
    X_trials, y_trials, validation = data
    (result,) = train_trials("linear", X_trials[:1], y_trials[:1], [0], epochs=4, batch_size=8,
                             validation_data=validation, validation_freq=2)
    assert len(result.history["loss"]) == 4 and len(result.history["val_loss"]) == 2


def test_result_becomes_a_fitted_head(data):
    X_trials, y_trials, validation = data
    (result,) = train_trials("dropout-mlp512-tanh-dropout", X_trials[:1], y_trials[:1], [5], epochs=2, batch_size=4)
    head = result.to_head()
    np.testing.assert_array_equal(head.predict(validation[0]), result.predict(validation[0]))
    assert head.get_params()["random_state"] == 5 and head.history_ == result.history


def test_trials_must_share_their_classes(data):
    X_trials, y_trials, _ = data
    y_trials = y_trials.copy()
    y_trials[1] = 10
    with pytest.raises(ValueError, match="trial 1 holds classes"):
        train_trials("linear", X_trials, y_trials, SEEDS, epochs=1, batch_size=4)


def test_validation_does_not_change_training(data):
    """Training stops for each evaluation and resumes where it was: the weights are those of one run."""
    X_trials, y_trials, validation = data
    (plain,) = train_trials("dropout-mlp512-tanh-dropout", X_trials[:1], y_trials[:1], [3], epochs=5, batch_size=4)
    (validated,) = train_trials("dropout-mlp512-tanh-dropout", X_trials[:1], y_trials[:1], [3], epochs=5,
                                batch_size=4, validation_data=validation, validation_freq=2)
    for a, b in zip(plain.weights, validated.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain.history["loss"] == validated.history["loss"] and len(validated.history["val_loss"]) == 2


def test_adam_epsilon_is_a_setting(data):
    """Keras' default epsilon (1e-7) is the default; a larger one damps Adam's steps (Keras 1 used 1e-8)."""
    from classifiers.heads import head_spec, initial_weights

    X_trials, y_trials, _ = data
    runs = {eps: train_trials("linear", X_trials[:1], y_trials[:1], SEEDS[:1], epochs=3, batch_size=4, epsilon=eps)[0]
            for eps in (1e-7, 1e-8, 1.0)}
    (default,) = train_trials("linear", X_trials[:1], y_trials[:1], SEEDS[:1], epochs=3, batch_size=4)
    np.testing.assert_array_equal(default.weights[0], runs[1e-7].weights[0])
    start = initial_weights(head_spec("linear"), X_trials.shape[2], 3, SEEDS[0])[0]
    moved = {eps: np.abs(run.weights[0] - start).sum() for eps, run in runs.items()}
    assert moved[1.0] < 0.5 * moved[1e-7]
    assert moved[1e-8] == pytest.approx(moved[1e-7], rel=1e-2)
    assert runs[1e-8].params["epsilon"] == 1e-8
