"""Saved heads load back and predict exactly as before; loading a head file cannot run code: a tampered
file, a pickle, an untrusted type, a Lambda layer and a link out of the heads folder are all refused."""

import json
import pickle

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from classifiers.baselines import make_head
from classifiers.persistence import convert_joblib_head, load_head, save_head, sidecar_path
from extractor.errors import ChecksumError, InvalidInputError, UntrustedModelError
from extractor.paths import file_sha256

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(n_samples=40, n_features=8, n_informative=4, n_classes=3, random_state=0)
    return X.astype(np.float32), np.array(CLASSES)[y]


def fitted(name, data):
    params = {"linear": {"epochs": 1}, "mlp512-tanh-dropout": {"epochs": 3},
              "logreg": {"Cs": (1.0,), "n_splits": 2}}.get(name, {})
    return make_head(name, random_state=0, **params).fit(*data)


class CreatesAFileWhenLoaded:
    """What an attacker would plant: unpickling it writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_sidecar(path, kind="sklearn", **fields):
    """A sidecar that matches the file at `path`, as a forger would write it."""
    sidecar_path(path).write_text(json.dumps({"format": 2, "kind": kind, "sha256": file_sha256(path),
                                              "backbone_fingerprint": "f" * 64, "class_names": CLASSES, **fields}))


@pytest.mark.parametrize("name", ["mlp512-tanh-dropout", "logreg", "knn", "linear-svm", "ridge"])
def test_round_trip_predicts_the_same(name, data, tmp_path):
    X, _ = data
    head = fitted(name, data)
    path = save_head(head, tmp_path / "head", backbone_fingerprint="f" * 64, class_names=CLASSES)
    assert path.suffix == (".keras" if name == "mlp512-tanh-dropout" else ".skops")
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["backbone_fingerprint"] == "f" * 64 and {"tensorflow", "keras", "sklearn", "numpy",
                                                            "skops"} <= set(sidecar["versions"])
    loaded = load_head(path)
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    if hasattr(head, "predict_proba"):
        np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    if name == "mlp512-tanh-dropout":  # a skops round trip gives new estimator objects, which compare by identity
        assert loaded.get_params() == head.get_params()


@pytest.mark.parametrize("name", ["linear", "ridge"])
def test_tampered_file_is_refused(name, data, tmp_path):
    path = save_head(fitted(name, data), tmp_path / "head", backbone_fingerprint="f" * 64, class_names=CLASSES)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        load_head(path)


def test_an_old_joblib_head_is_refused_with_how_to_resave_it(data, tmp_path):
    X, _ = data
    head = fitted("ridge", data)
    path = tmp_path / "old.joblib"
    joblib.dump(head, path)
    write_sidecar(path)
    with pytest.raises(UntrustedModelError, match="joblib head") as refused:
        load_head(path)
    assert "python -m classifiers train" in str(refused.value) and "convert_joblib_head" in str(refused.value)
    converted = convert_joblib_head(path)
    assert converted == tmp_path / "old.skops" and not path.exists() and not sidecar_path(path).exists()
    np.testing.assert_array_equal(load_head(converted).predict(X), head.predict(X))


def test_a_pickle_never_runs_whatever_it_is_called(tmp_path):
    marker = tmp_path / "the pickle ran"
    for name in ("evil.joblib", "evil.skops", "evil.keras"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(CreatesAFileWhenLoaded(marker)))
        write_sidecar(path, kind="keras" if name.endswith(".keras") else "sklearn",
                      params={}, classes=[0, 1, 2], fitted={"n_features_in_": 4, "history_": {}})
        with pytest.raises((UntrustedModelError, InvalidInputError)):
            load_head(path)
    assert not marker.exists()


def test_an_untrusted_type_is_refused_by_name(data, tmp_path):
    class Sneaky(LogisticRegression):
        pass

    Sneaky.__qualname__ = "Sneaky"  # a class of this module, as an attacker's own would be
    head = Sneaky().fit(*data)
    with pytest.raises(UntrustedModelError, match="test_persistence.Sneaky"):
        save_head(head, tmp_path / "sneaky", backbone_fingerprint="f" * 64, class_names=CLASSES)
    assert not (tmp_path / "sneaky.skops").exists()
    path = tmp_path / "forged.skops"  # written by hand, past save_head's check
    skops.io.dump(head, path)
    write_sidecar(path)
    with pytest.raises(UntrustedModelError, match=r"types that are not trusted: test_persistence\.Sneaky"):
        load_head(path)


def test_a_keras_head_with_a_lambda_layer_is_refused(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2),
                              keras.layers.Dense(3, activation="softmax")])
    path = tmp_path / "lambda.keras"
    model.save(path)
    write_sidecar(path, kind="keras", params={}, classes=[0, 1, 2], fitted={"n_features_in_": 4, "history_": {}})
    with pytest.raises(UntrustedModelError, match="Lambda layer"):
        load_head(path)


def test_a_link_out_of_the_heads_folder_is_refused(data, tmp_path):
    outside, heads = tmp_path / "outside", tmp_path / "heads"
    heads.mkdir()
    saved = save_head(fitted("ridge", data), outside / "lr", backbone_fingerprint="f" * 64, class_names=CLASSES)
    (heads / saved.name).symlink_to(saved)
    (heads / sidecar_path(saved).name).symlink_to(sidecar_path(saved))
    with pytest.raises(UntrustedModelError, match="outside the heads folder"):
        load_head(heads / saved.name)
    with pytest.raises(UntrustedModelError, match="outside the heads folder"):
        load_head(outside / saved.name, folder=heads)
    (heads / "real").mkdir()  # a link that stays inside the folder is fine
    inside = save_head(fitted("ridge", data), heads / "real" / "lr", backbone_fingerprint="f" * 64,
                       class_names=CLASSES)
    (heads / "alias.skops").symlink_to(inside)
    (heads / "alias.skops.json").symlink_to(sidecar_path(inside))
    assert load_head(heads / "alias.skops").predict(data[0]).shape == (40,)


def test_the_service_refuses_a_planted_pickle_and_a_link_out_at_start(data, tmp_path):
    """What the server loads goes through `load_head`: a pickle with a forged sidecar is never unpickled."""
    from extractor.cli import saved_heads

    heads, marker = tmp_path / "heads", tmp_path / "the pickle ran"
    save_head(fitted("ridge", data), heads / "lr", backbone_fingerprint="f" * 64, class_names=CLASSES)
    assert set(saved_heads(heads)) == {"lr"}
    planted = heads / "planted.joblib"
    planted.write_bytes(pickle.dumps(CreatesAFileWhenLoaded(marker)))
    write_sidecar(planted)
    with pytest.raises(UntrustedModelError, match="joblib head"):
        saved_heads(heads)
    assert not marker.exists()
    planted.unlink()
    elsewhere = save_head(fitted("ridge", data), tmp_path / "elsewhere" / "x", backbone_fingerprint="f" * 64,
                          class_names=CLASSES)
    (heads / "x.skops").symlink_to(elsewhere)
    (heads / "x.skops.json").symlink_to(sidecar_path(elsewhere))
    with pytest.raises(UntrustedModelError, match="outside the heads folder"):
        saved_heads(heads)
