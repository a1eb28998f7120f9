"""The Python API: the README's example runs as written; arrays, paths and data specs embed alike; the
command line and the API give the same vectors; an unknown feature set points at `extractor store info`."""

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import random_images
from extractor import api, paths
from extractor.errors import InvalidInputError, UnknownFeatureSetError


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    text = (paths.PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXTRACTOR_STORE", str(tmp_path / "store.sqlite"))
    namespace = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "linear" in printed and "logreg" in printed and "heads/digits.skops" in printed
    X, y, class_names = namespace["X"], namespace["y"], namespace["class_names"]
    assert X.shape == (100, 512) and X.dtype == np.float32 and class_names == ["1", "3", "5", "7", "9"]
    assert namespace["vectors"].shape == (4, 512)
    assert min(namespace["result"].methods[1].accuracies) > 0.7  # logreg on VGG16 digits, as the lecture's table
    assert api.load_feature_set("elsewhere")[2] == ["a", "b"] and api.describe_feature_set("elsewhere").external
    exported = pd.read_parquet(tmp_path / "digits-train.parquet")
    assert exported["source"].str.fullmatch(r"\d+").all() and set(exported["label_name"]) == set(class_names)


def test_arrays_paths_and_a_data_spec_give_the_same_vectors(tmp_path, spec):
    images = random_images(5, seed=3)
    root = tmp_path / "pictures"
    for i, image in enumerate(images):
        (root / ("odd" if i % 2 else "even")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / ("odd" if i % 2 else "even") / f"{i}.png")
    files = [root / ("odd" if i % 2 else "even") / f"{i}.png" for i in range(5)]
    store = tmp_path / "store.sqlite"
    from_arrays, y, names = api.embed(np.stack(images), spec, labels=["even", "odd"] * 2 + ["even"], store=store)
    assert names == ["even", "odd"] and y.tolist() == [0, 1, 0, 1, 0]
    from_paths, _, unlabelled = api.embed(files, spec, store=store)
    assert unlabelled == ["unlabelled"]
    np.testing.assert_array_equal(from_paths, from_arrays)
    summary = api.embed_to_store(f"folder:{root}", spec, "pictures", store=store)
    assert summary.computed == 0 and summary.reused == 5  # every vector was computed once, above
    X, y_folder, folder_names = api.load_feature_set("pictures", store=store)
    order = [int(source.split("/")[1][:-4]) for source in api.feature_set_sources("pictures", store=store)]
    np.testing.assert_array_equal(X, from_arrays[order])
    assert folder_names == ["even", "odd"] and y_folder.tolist() == [i % 2 for i in order]


def test_the_embed_command_and_the_api_store_the_same_feature_set(tmp_path, spec):
    from extractor import cli

    x = np.stack(random_images(6, seed=4))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    assert cli.main(["embed", "--backbone", "vgg16", "--data", f"npz:{tmp_path / 'd.npz'}", "--feature-set", "cli",
                     "--store", str(tmp_path / "s.sqlite"), "--no-progress"]) == 0
    api.embed_to_store(f"npz:{tmp_path / 'd.npz'}", "vgg16", "api", store=tmp_path / "s.sqlite")
    by_cli, by_api = (api.load_feature_set(name, store=tmp_path / "s.sqlite") for name in ("cli", "api"))
    for a, b in zip(by_cli, by_api):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert api.feature_set_sources("cli", store=tmp_path / "s.sqlite") == [str(i) for i in range(6)]


def test_an_unknown_feature_set_says_where_to_look_and_lists_close_names(tmp_path):
    store = tmp_path / "s.sqlite"
    for name in ("digits-train", "digits-test", "cifar-train"):
        api.import_vectors(np.eye(2), name, store=store)
    with pytest.raises(UnknownFeatureSetError) as caught:
        api.load_feature_set("digits-tarin", store=store)
    lines = str(caught.value).splitlines()
    assert "`extractor store info --store" in lines[0] and lines[1] == "closest:"
    assert lines[2:4] == ["  digits-train", "  digits-test"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="brings its own labels"):
        api.as_dataset("mnist:small", labels=[1])
    with pytest.raises(InvalidInputError, match="not a mix"):
        api.as_dataset([np.zeros((4, 4, 3), np.uint8), "a.png"])
    with pytest.raises(InvalidInputError, match="got 2 labels for 3 items"):
        api.as_dataset(np.zeros((3, 4, 4, 3), np.uint8), labels=[0, 1])
