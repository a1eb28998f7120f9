"""Every head by name: the Keras heads and scikit-learn's cheap baselines, all scikit-learn classifiers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegressionCV, RidgeClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted

from classifiers.heads import HEAD_SPECS, KerasHead


class SweptLogisticRegression(ClassifierMixin, BaseEstimator):
    """Standardised logistic regression, C chosen by stratified cross-validation on the training set only
    (`C_` after fitting). Each fold walks the C path warm-started from the previous C's solution: 1.6x
    faster than fitting every (C, fold) pair from scratch (medians of 3 fits: 3.3 s vs 5.1 s for 1,000
    CIFAR-10 images of 1,536 features, 9 Cs, 5 folds)."""

    def __init__(self, Cs=tuple(np.logspace(-4, 4, 9)), n_splits: int = 5, max_iter: int = 2000,
                 random_state=None):
        self.Cs, self.n_splits, self.max_iter, self.random_state = Cs, n_splits, max_iter, random_state

    def fit(self, X, y):
        folds = StratifiedKFold(n_splits=self.n_splits, shuffle=True, random_state=self.random_state)
        self.model_ = Pipeline([("scale", StandardScaler()),
                                ("logreg", LogisticRegressionCV(Cs=list(self.Cs), cv=folds, max_iter=self.max_iter,
                                                                random_state=self.random_state, scoring="accuracy",
                                                                l1_ratios=(0.0,), use_legacy_attributes=False))])
        self.model_.fit(X, y)
        self.classes_ = self.model_.classes_
        self.n_features_in_ = self.model_.n_features_in_
        self.C_ = float(self.model_[-1].C_)
        self.n_iter_ = int(self.model_[-1].n_iter_.max())  # the most iterations any fit of the sweep took
        return self

    def predict(self, X):
        check_is_fitted(self)
        return self.model_.predict(X)

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.model_.predict_proba(X)

    def decision_function(self, X):
        check_is_fitted(self)
        return self.model_.decision_function(X)


def _knn(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("knn", KNeighborsClassifier(**params))])


def _linear_svm(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("svm", LinearSVC(random_state=random_state, **params))])


def _ridge(random_state=None, **params) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("ridge", RidgeClassifier(**params))])


BASELINES = {"logreg": SweptLogisticRegression, "knn": _knn, "linear-svm": _linear_svm, "ridge": _ridge}


def single_threaded_blas():
    """A context in which BLAS uses one thread: these fits are small, and OpenBLAS's spinning threads,
    competing for the cores with anything else (TensorFlow, other processes), made one logistic
    regression fit 60x slower (14.7 s instead of 0.23 s, measured on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def chosen_params(head) -> dict | None:
    """What a fitted head chose by cross-validation (logreg's C), or None."""
    return {"C": head.C_} if isinstance(head, SweptLogisticRegression) else None


def fit_trials(name: str, trials: Iterable[tuple[np.ndarray, np.ndarray]], seeds: Iterable[int]) -> list:
    """One fitted `name` baseline per trial's (X, y) and seed, trials side by side in threads with one
    BLAS thread each (1.3-1.5x faster than one after another on 2 cores; the same fits either way)."""
    def fit(X, y, seed):
        return make_head(name, random_state=seed).fit(X, y)

    with single_threaded_blas():
        return Parallel(n_jobs=-1, prefer="threads")(delayed(fit)(X, y, seed) for (X, y), seed in zip(trials, seeds))


def make_head(name: str, random_state=None, **params) -> ClassifierMixin:
    """An unfitted classifier for `name`: a `KerasHead` spec (params are its own) or a baseline
    (params go to the underlying scikit-learn classifier; `logreg` takes `Cs`, `n_splits` and `max_iter`)."""
    if name in HEAD_SPECS:
        return KerasHead(spec=name, random_state=random_state, **params)
    if name in BASELINES:
        return BASELINES[name](random_state=random_state, **params)
    raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted([*HEAD_SPECS, *BASELINES]))}")
