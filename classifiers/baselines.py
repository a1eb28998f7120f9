"""Every head by name: the Keras heads and scikit-learn's cheap baselines, all scikit-learn classifiers."""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from classifiers.heads import HEAD_SPECS, KerasHead


def _logreg(random_state=None, Cs=tuple(np.logspace(-4, 4, 9)), n_splits: int = 5, **params) -> GridSearchCV:
    """Standardised logistic regression, C chosen by stratified cross-validation on the training set only."""
    pipeline = Pipeline([("scale", StandardScaler()),
                         ("logreg", LogisticRegression(max_iter=2000, random_state=random_state, **params))])
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return GridSearchCV(pipeline, {"logreg__C": list(Cs)}, cv=folds)


def _knn(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("knn", KNeighborsClassifier(**params))])


def _linear_svm(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("svm", LinearSVC(random_state=random_state, **params))])


def _ridge(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("ridge", RidgeClassifier(**params))])


BASELINES = {"logreg": _logreg, "knn": _knn, "linear-svm": _linear_svm, "ridge": _ridge}


def single_threaded_blas():
    """A context in which BLAS uses one thread: these fits are small, and OpenBLAS's spinning threads,
    competing for the cores with anything else (TensorFlow, other processes), made one logistic
    regression fit 60x slower (14.7 s instead of 0.23 s, measured on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def make_head(name: str, random_state=None, **params) -> ClassifierMixin:
    """An unfitted classifier for `name`: a `KerasHead` spec (params are its own) or a baseline
    (params go to the underlying scikit-learn classifier; `logreg` also takes `Cs` and `n_splits`)."""
    if name in HEAD_SPECS:
        return KerasHead(spec=name, random_state=random_state, **params)
    if name in BASELINES:
        return BASELINES[name](random_state=random_state, **params)
    raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted([*HEAD_SPECS, *BASELINES]))}")
