"""Saved heads load back and predict exactly as before; a tampered model file is refused."""

import json

import numpy as np
import pytest
from sklearn.datasets import make_classification

from classifiers.baselines import make_head
from classifiers.persistence import load_head, save_head, sidecar_path
from extractor.errors import ChecksumError


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(n_samples=40, n_features=8, n_informative=4, n_classes=3, random_state=0)
    return X.astype(np.float32), np.array(["a", "b", "c"])[y]


@pytest.mark.parametrize("name", ["mlp512-tanh-dropout", "logreg"])
def test_round_trip_predicts_the_same(name, data, tmp_path):
    X, y = data
    params = {"epochs": 3} if name != "logreg" else {"Cs": (1.0,), "n_splits": 2}
    head = make_head(name, random_state=0, **params).fit(X, y)
    path = save_head(head, tmp_path / "head", backbone_fingerprint="f" * 64, class_names=["a", "b", "c"])
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["backbone_fingerprint"] == "f" * 64 and set(sidecar["versions"]) == {
        "tensorflow", "keras", "sklearn", "numpy"}
    loaded = load_head(path)
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    if name != "logreg":  # a joblib round trip gives new estimator objects, which compare by identity
        assert loaded.get_params() == head.get_params()


@pytest.mark.parametrize("name", ["linear", "ridge"])
def test_tampered_file_is_refused(name, data, tmp_path):
    X, y = data
    head = make_head(name, random_state=0, **({"epochs": 1} if name == "linear" else {})).fit(X, y)
    path = save_head(head, tmp_path / "head", backbone_fingerprint="f" * 64, class_names=["a", "b", "c"])
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        load_head(path)
