"""Augmented views: seeded and deterministic, keyed by their pixels, cached like any image, never of test images."""

import numpy as np
import pytest

from classifiers.experiments import Experiment, ExperimentRunner, Features, Method, RunSettings
from conftest import make_npz
from extractor.augment import AugmentRecipe
from extractor.datasets import array_dataset, augmented_views, open_dataset
from extractor.embedder import Embedder, content_key
from extractor.errors import InvalidInputError
from extractor.jobs import run_embed_job
from extractor.models import get_backbone_spec
from extractor.store import EmbeddingStore

FINGERPRINT = "f" * 64


def digit_like(n: int, seed: int = 0) -> np.ndarray:
    """(n, 28, 28, 1) uint8: a bright blob per image on black, placed at random (structure for shifts to move)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for image in images:
        top, left = rng.integers(6, 14, 2)
        image[top:top + 8, left:left + 5] = rng.integers(128, 256)
    return images


def view_keys(dataset) -> list[bytes]:
    return [content_key(FINGERPRINT, dataset.load(i)) for i in range(len(dataset))]


def test_a_recipe_is_read_and_written_canonically():
    recipe = AugmentRecipe.parse("rotate10, flip,shift4")
    assert recipe == AugmentRecipe(flip=True, shift=4, rotate=10.0)
    assert recipe.text() == "flip,shift4,rotate10" and AugmentRecipe.parse(recipe.text()) == recipe


@pytest.mark.parametrize("text, message", [
    ("blur", "unknown augmentation 'blur'"), ("shift", "unknown augmentation 'shift'"),
    ("shift2,shift3", "given twice"), ("rotate90", "0 to 45 degrees"), ("shift0", "must flip, shift or rotate"),
])
def test_bad_recipes_are_refused_in_one_line(text, message):
    with pytest.raises(InvalidInputError, match=message):
        AugmentRecipe.parse(text)


def test_views_are_deterministic_for_a_seed_and_differ_between_views_and_seeds():
    image = digit_like(1)[0]
    recipe = AugmentRecipe.parse("shift2,rotate10")
    first = [recipe.view(image, 3, v) for v in range(4)]
    assert all(np.array_equal(a, recipe.view(image, 3, v)) for v, a in enumerate(first))
    assert all(a.shape == image.shape and a.dtype == np.uint8 for a in first)
    assert len({a.tobytes() for a in first}) == 4
    assert not np.array_equal(first[0], recipe.view(image, 4, 0))


def test_a_shift_is_a_crop_of_the_image_padded_by_its_edges_and_a_flip_mirrors():
    image = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    padded = np.pad(image, ((3, 3), (3, 3), (0, 0)), mode="edge")
    crops = {padded[3 - dy:3 - dy + 16, 3 - dx:3 - dx + 20].tobytes() for dy in range(-3, 4) for dx in range(-3, 4)}
    assert all(AugmentRecipe(shift=3).view(image, 0, v).tobytes() in crops for v in range(10))
    flips = [AugmentRecipe(flip=True).view(image, 0, v) for v in range(16)]
    assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)
    assert 0 < sum(np.array_equal(f, image[:, ::-1]) for f in flips) < 16


def test_an_image_has_the_same_views_wherever_it_comes():
    images = digit_like(6)
    recipe = AugmentRecipe.parse("shift2,rotate10")
    whole = augmented_views(array_dataset(images, np.arange(6) % 2), recipe, 2, seed=0)
    reordered = augmented_views(array_dataset(images[::-1], np.arange(6) % 2), recipe, 2, seed=0)
    assert view_keys(whole)[:2] == view_keys(reordered)[-2:]
    assert whole.labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    assert whole.sources[:2] == ["arrays[0]#view0", "arrays[0]#view1"]


def test_keys_are_stable_and_differ_by_recipe_and_seed(tmp_path):
    images = digit_like(8)
    path = tmp_path / "digits.npz"
    np.savez(path, x=images, y=np.arange(8) % 2)

    def keys(options):
        dataset = open_dataset(f"npz:{path}?{options}")
        return dataset.spec, view_keys(dataset)

    spec, base = keys("augment=shift2,rotate10&views=3&augment_seed=5")
    assert spec.endswith("?augment=shift2,rotate10&views=3&augment_seed=5") and len(base) == 24
    assert keys("augment=rotate10,shift2&augment_seed=5&views=3") == (spec, base)   # the same recipe, written apart
    originals = {content_key(FINGERPRINT, image) for image in images}
    others = [keys("augment=shift2,rotate10&views=3&augment_seed=6")[1],
              keys("augment=shift1,rotate10&views=3&augment_seed=5")[1],
              keys("augment=rotate10&views=3&augment_seed=5")[1]]
    for other in others:
        assert not set(other) & set(base) and not set(other) & originals


@pytest.mark.parametrize("spec", ["mnist:test?augment=shift2", "mnist:small-test?augment=shift2&views=2",
                                  "cifar10:test?per_class=2&augment=flip"])
def test_test_splits_are_never_augmented(spec):
    with pytest.raises(InvalidInputError, match="test images are never augmented"):
        open_dataset(spec)


def test_views_need_a_recipe():
    with pytest.raises(InvalidInputError, match="need augment=RECIPE"):
        open_dataset("mnist:small?views=2")


def test_a_second_embedding_of_the_views_is_all_cache_hits(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    dataset = augmented_views(array_dataset(images, np.arange(6) % 3), AugmentRecipe.parse("flip,shift4,rotate10"),
                              2, seed=0)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        embedder = Embedder(get_backbone_spec("vgg16"), store)
        first = run_embed_job(dataset, embedder, "views")
        again = run_embed_job(augmented_views(array_dataset(images, np.arange(6) % 3),
                                              AugmentRecipe.parse("rotate10,shift4,flip"), 2, seed=0),
                              Embedder(get_backbone_spec("vgg16"), store), "views-again")
        assert (first.computed, again.computed, again.reused) == (12, 0, 12)
        np.testing.assert_array_equal(store.load_feature_set("views")[0], store.load_feature_set("views-again")[0])


def test_the_augment_row_trains_with_and_without_views_on_the_same_trials(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    train, test = make_npz(folder / "train.npz", 60, seed=1), make_npz(folder / "test.npz", 30, seed=2)
    row = Method("explored: augment", "augment", "linear", Features("vgg16"), epochs=2, batch_size=4, explored=True,
                 augment="flip,shift4,rotate5", views=3)
    experiment = Experiment("tiny", "random images", train + "?per_class=4&seed={seed}", test, (row,))
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        short = ExperimentRunner(store, RunSettings(trials=5, augment_trials=2, augment_views=2)).run(experiment)
        names = [info.name for info in store.feature_sets()]
        full = ExperimentRunner(store, RunSettings(trials=2, full=True)).run(experiment)
    (augmented,), (augmented_full,) = short.methods, full.methods
    settings = augmented.settings
    assert len(augmented.accuracies) == 2 and len(settings["without_augmentation"]) == 2
    assert settings["views"] == 2 and settings["training_images"] == 12 * 3
    assert settings["augment"] == "flip,shift4,rotate5"
    assert settings["augment_seeds"] == settings["trials_seeds"] == [0, 1]
    assert "without augmentation on the same trials" in augmented.note and "2 of 3 views" in augmented.note
    assert augmented_full.settings["views"] == 3
    assert augmented_full.settings["views_computed"] == 2 * 12 * 1   # views 0 and 1 of each image are stored already
    views = [name for name in names if "augment=" in name]
    assert len(views) == 2
    assert all("train.npz" in name and "augment=flip,shift4,rotate5&views=2" in name for name in views)
    assert not any("test.npz" in name and "augment=" in name for name in names)
