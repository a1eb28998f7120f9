"""KerasHead and the baseline heads behave as scikit-learn classifiers; bad names are refused clearly."""

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.utils.estimator_checks import parametrize_with_checks

from classifiers.baselines import make_head
from classifiers.heads import HEAD_SPECS, KerasHead


@parametrize_with_checks(
    [KerasHead(epochs=10, batch_size=16, learning_rate=0.1, random_state=0),
     make_head("logreg", random_state=0, Cs=(0.1, 10.0), n_splits=3)],
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_unknown_spec_names_the_known_ones():
    X, y = make_classification(n_samples=20, random_state=0)
    with pytest.raises(ValueError, match=r"unknown head spec 'mpl512'; known: .*mlp512-tanh"):
        KerasHead("mpl512").fit(X, y)


def test_unknown_head_name_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown head 'svm'; known: .*linear-svm.*logreg"):
        make_head("svm")


@pytest.mark.parametrize("name", sorted(HEAD_SPECS) + ["logreg", "knn", "linear-svm", "ridge"])
def test_every_head_learns_arbitrary_labels(name):
    X, y = make_classification(n_samples=60, n_features=10, n_informative=5, n_classes=3, random_state=0)
    labels = np.array(["cat", "dog", "emu"])[y]
    params = {"epochs": 20, "batch_size": 8, "learning_rate": 0.01} if name in HEAD_SPECS else {}
    head = make_head(name, random_state=0, **params).fit(X, labels)
    assert set(head.predict(X)) <= set(labels)
    assert head.score(X, labels) > 0.6


def test_history_has_keras_keys_per_epoch():
    X, y = make_classification(n_samples=30, n_features=6, random_state=0)
    head = KerasHead("dropout-linear", epochs=3, batch_size=4, random_state=0).fit(X, y, validation_data=(X, y))
    assert sorted(head.history_) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert all(len(values) == 3 for values in head.history_.values())


def test_same_seed_same_weights():
    X, y = make_classification(n_samples=30, n_features=6, random_state=0)
    heads = [KerasHead("mlp512-tanh-dropout", epochs=2, random_state=3).fit(X, y) for _ in range(2)]
    for a, b in zip(*(h.model_.get_weights() for h in heads)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", sorted(HEAD_SPECS))
def test_the_classic_model_the_trained_head_and_the_saved_head_have_one_layout(spec):
    """One builder: the classic end-to-end head, the head that trains (seeded dropout) and the saved one."""
    from classifiers.heads import build_head_layers, head_layers, inference_model, initial_weights

    def layout(layers):
        return [(type(layer).__name__.replace("StepDropout", "Dropout"), getattr(layer, "units", None),
                 getattr(layer, "rate", None), getattr(getattr(layer, "activation", None), "__name__", None))
                for layer in layers]

    weights = initial_weights(HEAD_SPECS[spec], 12, 3, seed=0)
    classic = layout(head_layers(spec, 3))
    assert classic == layout(build_head_layers(spec, 12, 3, seed=0)) == layout(inference_model(spec, weights).layers)
    assert classic[-1] == ("Dense", 3, None, "softmax")


def test_validation_labels_unseen_in_training_are_named():
    X, y = make_classification(n_samples=20, n_features=4, random_state=0)
    with pytest.raises(ValueError, match=r"labels \[7\] are not among the classes \[0, 1\]"):
        KerasHead(epochs=1).fit(X, y, validation_data=(X[:2], [0, 7]))
