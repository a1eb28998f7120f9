"""The classic baseline's runs: whole epochs per compiled call train exactly the lecture's `fit`."""

import numpy as np
import pytest

from classifiers.classic import WARMUP_STEPS, ClassicRun, fit_classic, slow_step_share, steady_epoch_seconds
from extractor.pretrain import mnist_cnn


def test_a_run_for_results_trains_the_same_weights_as_one_step_per_call():
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.random((30, 28, 28, 1), dtype=np.float32), rng.integers(0, 3, 30)
    keras.utils.set_random_seed(7)
    run = fit_classic(model := mnist_cnn(3), x, y, x[:8], y[:8], epochs=2, batch_size=4, seed=7)
    keras.utils.set_random_seed(7)
    plain = mnist_cnn(3)
    keras.utils.set_random_seed(7)  # as fit_classic seeds after the model is built
    plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer="adam", metrics=["accuracy"])
    history = plain.fit(x, y, epochs=2, batch_size=4, verbose=0).history  # 8 steps an epoch, the last partial
    for got, want in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert run.history["loss"] == [float(v) for v in history["loss"]] and run.epochs == 2


def test_a_timing_run_records_its_steady_steps_and_validation_batches():
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 28, 28, 1), dtype=np.float32), rng.integers(0, 3, 40)
    x_test, y_test = rng.random((50, 28, 28, 1), dtype=np.float32), rng.integers(0, 3, 50)
    run = fit_classic(mnist_cnn(3), x, y, x_test, y_test, epochs=1, batch_size=4, seed=0, validate=True,
                      timing_only=True, validation_sample=20)
    assert run.steps_per_epoch == 10 and len(run.step_seconds) == 10 - WARMUP_STEPS
    assert run.validation_batches == 13 and len(run.validation_batch_seconds) == 5  # 20 of the 50, batch 4
    low, high = run.seconds_per_epoch_range
    assert 0 < low <= run.seconds_per_epoch <= high
    assert run.seconds_per_epoch == steady_epoch_seconds([run])[0]


def _timed(steps, validation=(), between=0.5):
    return ClassicRun(float("nan"), 0.0, 1, 0.0, {}, steps_per_epoch=25, step_seconds=list(steps),
                      between_steps_seconds=between, validation_batches=10 if len(validation) else 0,
                      validation_batch_seconds=list(validation))


def test_steady_epoch_seconds_pools_builds_and_keeps_the_steady_speed_when_slow_episodes_take_many_steps():
    rng = np.random.default_rng(1)
    fast = lambda n: 0.019 + 0.001 * rng.random(n)  # noqa: E731
    slow = lambda n: 0.034 + 0.002 * rng.random(n)  # noqa: E731
    # three builds, 40% of their steps in a slow episode; one build entirely slow
    builds = [_timed(fast(20)), _timed(slow(20)), _timed(np.concatenate([fast(16), slow(4)]))]
    per_epoch, low, high = steady_epoch_seconds(builds)
    assert 25 * 0.019 + 0.5 <= per_epoch <= 25 * 0.020 + 0.5
    assert low <= per_epoch < high and high >= 25 * 0.034 + 0.5
    assert slow_step_share(builds) == pytest.approx(24 / 60)
    # validation batches count per batch of the test set, with the same quantile
    steps = fast(20)
    with_validation = steady_epoch_seconds([_timed(steps, validation=[0.01] * 8 + [0.03] * 2)])[0]
    assert with_validation - steady_epoch_seconds([_timed(steps)])[0] == pytest.approx(10 * 0.01)
