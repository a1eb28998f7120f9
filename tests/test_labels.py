"""Labels become class indices in one place, the same for datasets, heads and the trainer."""

import numpy as np
import pytest

from classifiers.trainer import train_trials
from extractor.datasets import encode_labels
from extractor.errors import InvalidInputError
from extractor.labels import class_indices


def test_without_classes_they_are_the_sorted_distinct_labels():
    classes, indices = class_indices(["owl", "cat", "owl", "dog"])
    assert classes.tolist() == ["cat", "dog", "owl"] and indices.tolist() == [2, 0, 2, 1]


def test_given_classes_keep_their_order_and_unknown_labels_are_named():
    assert class_indices([30, 10, 30], [30, 20, 10])[1].tolist() == [0, 2, 0]
    with pytest.raises(InvalidInputError, match=r"labels \['emu'\] are not among the classes \['cat', 'dog'\]"):
        class_indices(["cat", "emu"], ["cat", "dog"])
    with pytest.raises(InvalidInputError, match=r"labels \['cat'\] are not among the classes \[0, 1\]"):
        class_indices(["cat"], [0, 1])


def test_datasets_and_the_trainer_agree_on_the_indices():
    names = ["owl", "cat", "dog", "cat", "owl", "dog"]
    y, class_names = encode_labels(names, 6)
    assert class_names == ["cat", "dog", "owl"] and y.tolist() == [2, 0, 1, 0, 2, 1]
    assert encode_labels(names, 6, class_names=["owl", "dog", "cat"])[0].tolist() == [0, 2, 1, 2, 0, 1]
    X = np.random.default_rng(0).normal(size=(1, 6, 4)).astype(np.float32)
    (trial,) = train_trials("linear", X, np.array([names]), [0], epochs=1, batch_size=2)
    assert trial.classes.tolist() == class_names
    with pytest.raises(ValueError, match=r"labels \['emu'\] are not among the classes"):
        train_trials("linear", X, np.array([names]), [0], 1, 2, validation_data=(X[0, :1], ["emu"]))
