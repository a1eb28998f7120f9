"""Experiments, reports and head comparison, end to end on tiny data."""

import json
import subprocess
import sys

import numpy as np
import pytest

from classifiers.experiments import Experiment, ExperimentRunner, Features, Method, RunSettings
from classifiers.report import ExperimentResult, MethodResult, format_table, new_run_dir, write_report
from classifiers.trial_cache import TrialCache
from conftest import make_npz
from extractor.store import EmbeddingStore


def test_report_has_the_documented_form(tmp_path):
    rows = [MethodResult("transfer", [0.91, 0.93], 1.5, {"epochs": 3}, (91.0, 92.6),
                         [{"accuracy": [0.5, 0.9], "val_accuracy": [0.4, 0.8]}] * 2),
            MethodResult("scratch", [0.80], 9.0, {}, (84.0, 87.3), note="1 of 15 trials")]
    experiment = ExperimentResult("tl_mnist", "digits", rows)
    table = format_table(experiment)
    assert "91.0-93.0%" in table and "92.0%" in table and "91.0-92.6%" in table and "within" in table
    assert "below" in table and "note: scratch: 1 of 15 trials" in table
    run_dir = new_run_dir(tmp_path / "runs")
    written = write_report(run_dir, [experiment], timings={"tl_mnist": {"classic": 100.0, "cached": 1.0}})
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()
    report = json.loads((run_dir / "report.json").read_text())
    method = report["experiments"]["tl_mnist"]["methods"]["transfer"]
    assert method["accuracies"] == [0.91, 0.93] and method["trials"] == 2
    assert {"min", "max", "mean", "seconds", "settings"} <= set(method)
    assert report["experiments"]["tl_mnist"]["lecture"] == {"transfer": [91.0, 92.6], "scratch": [84.0, 87.3]}
    assert "environment" in report
    assert sorted(p.name for p in written if p.suffix == ".png") == [
        "time-classic-vs-cached.png", "tl_mnist-accuracy.png", "tl_mnist-learning-curves.png"]
    assert all(p.stat().st_size > 5000 for p in written if p.suffix == ".png")


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    train = make_npz(folder / "train.npz", 60, seed=1)
    test = make_npz(folder / "test.npz", 30, seed=2)
    features = Features("vgg16")
    return Experiment("tiny", "random images", train + "?per_class=6&seed={seed}", test, (
        Method("head", "head", "linear", features, epochs=3, batch_size=4, lecture=(0.0, 100.0), validate=True),
        Method("logreg", "sklearn", "logreg", features, beyond=True),
        Method("scratch", "scratch", "relu", None, epochs=1, batch_size=8),
        Method("classic", "classic", "linear", features, epochs=3, batch_size=4),
    ))


def test_runner_trains_every_kind_of_row(tmp_path, tiny_experiment):
    cache = TrialCache(tmp_path / "trials")
    settings = RunSettings(trials=2)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        result = ExperimentRunner(store, settings, trial_cache=cache).run(tiny_experiment)
        rows = {row.name: row for row in result.methods}
        assert len(rows["head"].accuracies) == 2 and len(rows["head"].histories[0]["val_accuracy"]) == 3
        assert len(rows["logreg"].accuracies) == 2
        assert len(rows["scratch"].accuracies) == 1 and "1 of 2 trials" in rows["scratch"].note
        assert rows["classic"].accuracies == [] and "timing only" in rows["classic"].note
        classic = rows["classic"].settings
        low, high = classic["seconds_per_full_trial_range"]
        assert 0 < low <= classic["seconds_per_full_trial"] <= high and classic["warmup_seconds"] >= 0
        assert 0 <= classic["slow_step_share"] < 1
        assert "steady-state steps" in rows["classic"].note and "warm-up" in rows["classic"].note
        timing = result.details["timing"]
        assert timing["classic_full_table_seconds"] > 0  # a tiny table's ratio may round to 0.0
        # the speed-up is of the unrounded seconds: within what rounding each to its printed digits allows
        classic_s, cached_s = timing["classic_full_table_seconds"], timing["cached_full_table_seconds"]
        assert (classic_s - 0.05) / (cached_s + 0.005) - 0.05 <= timing["speedup"] \
            <= (classic_s + 0.05) / max(cached_s - 0.005, 1e-9) + 0.05
        assert timing["speedup_range"][0] <= timing["speedup"] <= timing["speedup_range"][1]
        assert 18 + 30 <= result.details["embedding"]["vgg16/lecture/32/flatten"]["computed"] <= 2 * 18 + 30

        again = ExperimentRunner(store, settings, trial_cache=cache).run(tiny_experiment)
        rows_again = {row.name: row for row in again.methods}
        assert rows_again["head"].accuracies == rows["head"].accuracies  # same seeds, same outcome
        assert rows_again["scratch"].accuracies == rows["scratch"].accuracies
        assert "reused from the trial cache" in rows_again["scratch"].note
        assert again.details["embedding"]["vgg16/lecture/32/flatten"]["computed"] == 0


def synthetic_sets(store_path, rng):
    """Feature sets "train" (30) and "test" (60) of 8-d vectors around three class centres."""
    centers = rng.normal(size=(3, 8)) * 3
    with EmbeddingStore(store_path) as store:
        for name, n in (("train", 30), ("test", 60)):
            labels = np.arange(n) % 3
            vectors = (centers[labels] + rng.normal(size=(n, 8))).astype(np.float32)
            keys = [rng.bytes(32) for _ in range(n)]
            store.begin_feature_set(name, fingerprint="f" * 64, backbone={"name": "x"}, data_spec="synthetic",
                                    class_names=["a", "b", "c"])
            store.append_batch(name, 0, keys, labels, keys, vectors)
            store.finish_feature_set(name, n)


def test_compare_command(tmp_path):
    rng = np.random.default_rng(0)
    store_path = tmp_path / "s.sqlite"
    synthetic_sets(store_path, rng)
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(store_path), "--runs-dir",
                          str(tmp_path / "runs"), "compare", "--train-set", "train", "--test-set", "test",
                          "--heads", "linear,logreg,knn", "--trials", "3", "--epochs", "60"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "linear" in out.stdout and "logreg" in out.stdout and "knn" in out.stdout
    assert not (tmp_path / "runs" / "latest").exists()  # the main job's report keeps its place
    report = json.loads((tmp_path / "runs" / "latest-compare" / "report.json").read_text())
    methods = report["experiments"]["compare"]["methods"]
    assert methods["linear"]["trials"] == 3 and methods["linear"]["mean"] > 0.8
    assert methods["logreg"]["mean"] > 0.8


def test_compare_refuses_sets_from_different_backbones(tmp_path):
    store_path = tmp_path / "s.sqlite"
    with EmbeddingStore(store_path) as store:
        for name, fingerprint in (("a", "1" * 64), ("b", "2" * 64)):
            store.begin_feature_set(name, fingerprint=fingerprint, backbone={}, data_spec="d", class_names=["x"])
            store.append_batch(name, 0, [name.encode() * 32], [0], [name.encode() * 32], np.ones((1, 2), np.float32))
            store.finish_feature_set(name, 1)
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(store_path), "compare",
                          "--train-set", "a", "--test-set", "b"], capture_output=True, text=True)
    assert out.returncode == 2 and "different backbones" in out.stderr


@pytest.mark.parametrize("head", ["logreg", "linear"])
def test_a_trained_and_saved_head_is_served_with_its_class_names(tmp_path, head):
    from extractor.cli import saved_heads

    store_path = tmp_path / "s.sqlite"
    synthetic_sets(store_path, np.random.default_rng(1))
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(store_path), "train",
                          "--train-set", "train", "--head", head, "--epochs", "100", "--out",
                          str(tmp_path / "heads" / "abc")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    heads = saved_heads(tmp_path / "heads")
    assert list(heads) == ["abc"] and heads["abc"].class_names == ["a", "b", "c"]
    assert heads["abc"].backbone_fingerprint == "f" * 64
    with EmbeddingStore(store_path, readonly=True) as store:
        X, y, _ = store.load_feature_set("test")
    probabilities = heads["abc"].model.predict_proba(X)
    assert probabilities.shape == (60, 3) and np.mean(probabilities.argmax(1) == y) > 0.8


def test_run_command_rejects_unknown_experiments(tmp_path):
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(tmp_path / "s.sqlite"), "run",
                          "--experiments", "cifar_vgg,nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown experiment 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_explored_rows_fine_tune_and_sweep(tmp_path):
    """The explored rows through the runner: fewer trials in the short default, every trial with FULL=1;
    the sweep's pick, its grid in the report and the plot of accuracy against learning rate."""
    folder = tmp_path / "data"
    folder.mkdir()
    train = make_npz(folder / "train.npz", 60, seed=1)
    test = make_npz(folder / "test.npz", 30, seed=2)
    experiment = Experiment("tiny", "random images", train + "?per_class=6&seed={seed}", test, (
        Method("explored: fine-tune block 5", "fine-tune", "linear", Features("vgg16_block4"), epochs=2,
               batch_size=4, explored=True, fine_tunes=Features("vgg16"), block_epochs=1),
        Method("explored: sweep", "sweep", "linear", Features("vgg16"), epochs=2, batch_size=4, explored=True),
    ))
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        short = ExperimentRunner(store, RunSettings(trials=3)).run(experiment)
        full = ExperimentRunner(store, RunSettings(trials=2, full=True)).run(
            Experiment(**{**experiment.__dict__, "methods": experiment.methods[1:]}))
    fine_tune, sweep = short.methods
    assert len(fine_tune.accuracies) == 1 and "short default: 1 trial(s)" in fine_tune.note
    assert len(fine_tune.histories[0]["loss"]) == 3 and fine_tune.settings["block_epochs"] == 1
    assert len(sweep.accuracies) == 2 and "picked" in sweep.note and "validation split" in sweep.note
    grid = sweep.settings["sweep"]
    assert len(grid["points"]) == 9 and {p["optimizer"] for p in grid["points"]} == {"adam", "rmsprop", "sgd"}
    assert (grid["chosen"]["optimizer"], grid["chosen"]["learning_rate"]) == (
        sweep.settings["optimizer"], sweep.settings["learning_rate"])
    assert len(full.methods[0].accuracies) == 2 and full.methods[0].note.startswith("picked")
    written = write_report(new_run_dir(tmp_path / "runs"), [short])
    assert any(p.name == "tiny-sweeps.png" and p.stat().st_size > 5000 for p in written)


def test_compare_sweeps_optimizers_and_learning_rates(tmp_path):
    store_path = tmp_path / "s.sqlite"
    synthetic_sets(store_path, np.random.default_rng(0))
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(store_path), "--runs-dir",
                          str(tmp_path / "runs"), "compare", "--train-set", "train", "--test-set", "test",
                          "--heads", "linear,knn", "--trials", "2", "--epochs", "20", "--optimizers", "adam,sgd",
                          "--learning-rates", "1e-3,1e-2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    methods = json.loads((tmp_path / "runs" / "latest-compare" / "report.json").read_text())["experiments"]["compare"]["methods"]
    assert sorted(methods) == sorted(["knn", "linear adam lr=0.001", "linear adam lr=0.01", "linear sgd lr=0.001",
                                      "linear sgd lr=0.01", next(m for m in methods if "sweep pick" in m)])
    pick = next(m for name, m in methods.items() if "sweep pick" in name)
    chosen = pick["settings"]["sweep"]["chosen"]
    assert pick["accuracies"] == methods[f"linear {chosen['optimizer']} lr={chosen['learning_rate']:g}"]["accuracies"]
    assert all("test_mean" in p for p in pick["settings"]["sweep"]["points"])
    assert (tmp_path / "runs" / "latest-compare" / "compare-sweeps.png").is_file()


def test_compare_refuses_an_unknown_optimizer(tmp_path):
    store_path = tmp_path / "s.sqlite"
    synthetic_sets(store_path, np.random.default_rng(0))
    out = subprocess.run([sys.executable, "-m", "classifiers", "--store", str(store_path), "compare", "--train-set",
                          "train", "--test-set", "test", "--optimizers", "adam,adagrad"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown optimizer 'adagrad'" in out.stderr and "Traceback" not in out.stderr
