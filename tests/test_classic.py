"""The classic baseline's runs: whole epochs per compiled call train exactly the lecture's `fit`."""

import numpy as np

from classifiers.classic import fit_classic
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
