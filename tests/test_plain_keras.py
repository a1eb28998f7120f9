"""Every saved Keras head opens with plain `keras.models.load_model` in a process that never imported this
project, and predicts there what the project predicts."""

import json
import subprocess
import sys
import textwrap

import numpy as np
from sklearn.datasets import make_classification

from classifiers.heads import HEAD_SPECS, KerasHead
from classifiers.persistence import save_head
from classifiers.trainer import train_trials

# Run from an empty folder with a clean sys.path: the project is importable only by name, and the check
# below fails if anything imported it.
PLAIN_KERAS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    out = {}
    X = np.load(sys.argv[1])
    for path in sys.argv[2:]:
        out[path] = keras.models.load_model(path).predict(X, verbose=0).tolist()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("classifiers", "extractor", "protos"))
    print(json.dumps({"probabilities": out, "project_modules": leaked}))
""")


def test_every_saved_keras_head_opens_and_predicts_in_plain_keras(tmp_path):
    X, y = make_classification(n_samples=40, n_features=8, n_informative=4, n_classes=3, random_state=0)
    X = X.astype(np.float32)
    labels = np.array(["cat", "dog", "emu"])[y]
    heads = {name: KerasHead(name, epochs=2, batch_size=8, random_state=0).fit(X, labels) for name in HEAD_SPECS}
    # The fast trainer's heads are saved the same way.
    (trial,) = train_trials("dropout-mlp512-tanh-dropout", X[None], labels[None], [1], epochs=2, batch_size=8)
    heads["trainer"] = trial.to_head()
    paths = {name: str(save_head(head, tmp_path / name, backbone_fingerprint="f" * 64, class_names=["cat", "dog", "emu"]))
             for name, head in heads.items()}
    np.save(tmp_path / "X.npy", X)
    run = subprocess.run([sys.executable, "-I", "-c", PLAIN_KERAS, str(tmp_path / "X.npy"), *paths.values()],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["project_modules"] == []
    for name, head in heads.items():
        plain = np.array(result["probabilities"][paths[name]], np.float32)
        np.testing.assert_allclose(plain, head.predict_proba(X), rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(head.classes_[plain.argmax(axis=1)], head.predict(X))
