"""Fine-tuning the last block on cached activations takes the steps of the classic end-to-end fine-tuning."""

import numpy as np
import pytest

from classifiers.fine_tuning import (
    FineTuning,
    classic_fine_tuning,
    fine_tune_trials,
    head_training_layers,
    remaining_block,
    train_block,
)
from classifiers.heads import KerasHead
from extractor.datasets import open_dataset
from extractor.errors import InvalidInputError
from extractor.models import get_backbone_spec, load_backbone

SEED = 8


@pytest.fixture(scope="module")
def vgg16(data_dir):
    """VGG16 cut at block4_pool and at block5_pool, 16 MNIST training images: pixels, activations, labels."""
    activations_spec = get_backbone_spec("vgg16_block4", data_dir=data_dir)
    full_spec = get_backbone_spec("vgg16", data_dir=data_dir)
    x, y = open_dataset("mnist:small?n=16&seed=1", data_dir).arrays()
    pixels = full_spec.preprocessing.apply(list(x), full_spec.input_size, full_spec.channels)
    return activations_spec, full_spec, pixels, load_backbone(activations_spec).embed(list(x)), y


def layer_scales(model) -> list[float]:
    """Per trainable weight, the largest magnitude among its layer's weights (a bias shares its kernel's)."""
    return [max(float(np.abs(w).max()) for w in layer.trainable_weights)
            for layer in model._flatten_layers(include_self=False) if not layer._layers
            for _ in layer.trainable_weights]


# The head's stage runs in the fast trainer, equal to Keras to float rounding (tests/test_trainer.py); on
# these VGG16 features, a few of the 512x512 hidden kernel's weights (1 in 262,144 here) whose gradient is
# near zero take an Adam step whose size that rounding decides: up to 5e-5 of the layer's scale.
@pytest.mark.parametrize("head, head_tolerance", [
    ("linear", 1e-5), pytest.param("dropout-mlp512-tanh-dropout", 1e-4, marks=pytest.mark.slow)])
def test_fine_tuning_on_cached_activations_equals_the_classic_one(vgg16, head, head_tolerance):
    """Both stages at the method's own rates: block 5's weights agree within 1e-5 of their layer's scale
    (the head's within `head_tolerance`), while block 5 moved far more than that."""
    activations_spec, full_spec, pixels, activations, y = vgg16
    setup = FineTuning(head, head_epochs=2, block_epochs=2, batch_size=4)
    block = remaining_block(activations_spec, full_spec)
    pretrained = [np.asarray(w) for w in block.weights]
    (trial,) = fine_tune_trials(block, activations[None], y[None], [SEED], setup)
    model, classes, history = classic_fine_tuning(activations_spec, full_spec, pixels, y, SEED, setup)

    expected = [np.asarray(w) for w in model.trainable_weights]
    assert len(expected) == len(trial.weights()) == 6 + (2 if head == "linear" else 4)
    tolerances = [1e-5] * 6 + [head_tolerance] * (len(expected) - 6)
    for want, got, scale, tolerance in zip(expected, trial.weights(), layer_scales(model), tolerances, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * scale)
    moved = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(trial.weights()[:6], pretrained))
    assert moved > 10 * 1e-5
    np.testing.assert_array_equal([np.asarray(w) for w in block.weights][0], pretrained[0])  # copied, not moved
    np.testing.assert_array_equal(trial.classes, classes)
    assert len(trial.history["loss"]) == 4
    np.testing.assert_allclose(trial.history["loss"], history["loss"], rtol=1e-4)
    np.testing.assert_array_equal(trial.predict(activations[:8]), classes[np.argmax(model.predict(pixels[:8]), 1)])


def test_the_block_stage_is_the_classic_computation_exactly(vgg16):
    """From the same stage-1 head, stage 2 on activations and on pixels agree to float rounding even at a
    high rate, where Adam's first steps (about the rate times the gradient's sign) would show any difference;
    the dropout masks carry on from stage 1's steps on both sides."""
    activations_spec, full_spec, pixels, activations, y = vgg16
    head_spec = "dropout-mlp512-tanh-dropout"
    setup = FineTuning(head_spec, head_epochs=2, block_epochs=2, batch_size=4, block_learning_rate=1e-3)
    features = load_backbone(full_spec).forward(pixels)
    head = KerasHead(head_spec, epochs=2, batch_size=4, random_state=SEED).fit(features, y)
    block = remaining_block(activations_spec, full_spec)
    trained = [w for layer in head.model_.layers for w in layer.get_weights()]
    layers = head_training_layers(head_spec, trained, SEED, steps=2 * 4)  # 2 epochs of 4 batches
    model, _ = train_block(block, layers, activations.reshape(-1, 2, 2, 512),
                           np.searchsorted(head.classes_, y).astype(np.int32), SEED, setup)
    classic, _, _ = classic_fine_tuning(activations_spec, full_spec, pixels, y, SEED, setup)
    for want, got, scale in zip(classic.trainable_weights, model.trainable_weights, layer_scales(classic), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * scale)


def test_unfrozen_blocks_keep_batch_normalization_frozen_in_inference_mode():
    import keras

    from classifiers.fine_tuning import unfreeze

    block = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(5, 3), keras.layers.BatchNormalization(),
                              keras.layers.ReLU()])
    block.trainable = False
    unfreeze(block)
    conv, norm, _ = block.layers
    assert conv.trainable and not norm.trainable
    statistics = [np.asarray(w).copy() for w in norm.non_trainable_weights]
    x = np.random.default_rng(0).normal(5.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(block(x, training=True), block(x, training=False))  # moving statistics used
    for before, after in zip(statistics, norm.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(np.asarray(after), before)


def test_the_cuts_must_be_of_one_model_in_order(data_dir):
    specs = {name: get_backbone_spec(name, data_dir=data_dir) for name in ("vgg16", "vgg16_block4", "squeezenet")}
    with pytest.raises(InvalidInputError, match="not before"):
        remaining_block(specs["vgg16"], specs["vgg16_block4"])
    with pytest.raises(InvalidInputError, match="differ in"):
        remaining_block(specs["vgg16_block4"], specs["squeezenet"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        FineTuning("linear", 1, 1, 0)
    with pytest.raises(ValueError, match="block_learning_rate must be positive"):
        FineTuning("linear", 1, 1, 4, block_learning_rate=0)


def test_efficientnet_lite0_head_conv_fine_tuned_on_cached_activations_equals_the_classic_one(data_dir):
    """The same method on another model: EfficientNet-Lite0's head conv (its BatchNormalization frozen) trained
    from the activations at its input, 7x7x320, equals the classic fine-tuning on 224x224 pixels."""
    activations_spec = get_backbone_spec("efficientnet_lite0_head_input", data_dir=data_dir)
    full_spec = get_backbone_spec("efficientnet_lite0", data_dir=data_dir)
    x, y = open_dataset("cifar10:small?per_class=1&seed=1", data_dir).arrays()
    pixels = full_spec.preprocessing.apply(list(x), full_spec.input_size, full_spec.channels)
    activations = load_backbone(activations_spec).embed(list(x))
    setup = FineTuning("linear", head_epochs=2, block_epochs=2, batch_size=4)
    block = remaining_block(activations_spec, full_spec)
    pretrained = np.asarray(block.get_layer("head_conv").kernel)
    (trial,) = fine_tune_trials(block, activations[None], y[None], [SEED], setup)
    model, _, history = classic_fine_tuning(activations_spec, full_spec, pixels, y, SEED, setup)

    expected = [np.asarray(w) for w in model.trainable_weights]
    assert [w.shape for w in expected] == [(1, 1, 320, 1280), (1280, 10), (10,)]  # head conv kernel, linear head
    for want, got, scale in zip(expected, trial.weights(), layer_scales(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    assert float(np.abs(trial.weights()[0] - pretrained).max() / np.abs(pretrained).max()) > 10 * 1e-5
    np.testing.assert_allclose(trial.history["loss"], history["loss"], rtol=1e-4)
