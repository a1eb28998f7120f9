"""Labels to class indices: the one place where label values or names become positions in a list of classes."""

from __future__ import annotations

import numpy as np

from extractor.errors import InvalidInputError


def class_indices(labels, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """(classes, indices (n,) int64): the position of each of the n labels in `classes`.

    Without `classes`, the classes are the distinct labels in sorted order (scikit-learn's `classes_`).
    With them (any order), a label that is not among them is an `InvalidInputError` naming it.
    """
    labels = np.asarray(labels).reshape(-1)
    if classes is None:
        classes, indices = np.unique(labels, return_inverse=True)
        return classes, indices.reshape(-1).astype(np.int64)
    classes = np.asarray(classes).reshape(-1)
    if not len(classes):
        if len(labels):
            raise InvalidInputError(f"got {len(labels)} labels but no classes")
        return classes, np.zeros(0, np.int64)
    order = np.argsort(classes, kind="stable")
    indices = order[np.searchsorted(classes, labels, sorter=order).clip(0, len(classes) - 1)]
    if not np.array_equal(classes[indices], labels):
        unknown = sorted(set(labels.tolist()) - set(classes.tolist()))
        raise InvalidInputError(f"labels {unknown[:5]} are not among the classes {classes.tolist()[:10]}")
    return classes, indices.astype(np.int64)
