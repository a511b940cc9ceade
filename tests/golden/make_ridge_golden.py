#!/usr/bin/python3
"""Writes tests/golden/ridge_small.json: a small ridge-classifier problem and
its solution by a direct numpy solve of the weighted, centered normal
equations that scikit-learn's RidgeClassifier uses:

    sw_i = 1, or n / (C * count(y_i)) for class_weight="balanced"
    Xc = X - average(X, weights=sw), Yc likewise, Y in {-1, +1} one-vs-all
    (Xc^T diag(sw) Xc + alpha I) B = Xc^T diag(sw) Yc
    coef = B^T, intercept = y_mean - coef @ x_mean, prediction = argmax

Run from the repository root with Debian's python3 (numpy):
    /usr/bin/python3 tests/golden/make_ridge_golden.py
"""
import json

import numpy as np


def fit(x, y, n_classes, alpha, balanced):
    n = x.shape[0]
    sw = np.ones(n)
    if balanced:
        counts = np.bincount(y, minlength=n_classes)
        sw = n / (n_classes * counts[y])
    targets = -np.ones((n, n_classes))
    targets[np.arange(n), y] = 1.0
    x_mean = np.average(x, axis=0, weights=sw)
    y_mean = np.average(targets, axis=0, weights=sw)
    xc = x - x_mean
    yc = targets - y_mean
    a = xc.T @ (sw[:, None] * xc) + alpha * np.eye(x.shape[1])
    b = xc.T @ (sw[:, None] * yc)
    coef = np.linalg.solve(a, b).T
    intercept = y_mean - coef @ x_mean
    return coef, intercept


def main():
    rng = np.random.default_rng(20240607)
    n_classes, d = 3, 5
    counts = [18, 9, 3]  # imbalanced on purpose
    centers = rng.normal(size=(n_classes, d)) * 0.8
    x = np.concatenate([centers[c] + rng.normal(size=(k, d)) for c, k in enumerate(counts)])
    y = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
    x_test = centers[rng.integers(0, n_classes, size=12)] + rng.normal(size=(12, d)) * 1.5
    # The C test reads float32 features: solve on exactly those values.
    x = x.astype(np.float32).astype(np.float64)
    x_test = x_test.astype(np.float32).astype(np.float64)

    cases = []
    for alpha, balanced in [(1.0, False), (1.0, True), (0.1, False), (10.0, True)]:
        coef, intercept = fit(x, y, n_classes, alpha, balanced)
        cases.append({
            "alpha": alpha,
            "balanced": balanced,
            "coef": coef.tolist(),
            "intercept": intercept.tolist(),
            "predictions": np.argmax(x @ coef.T + intercept, axis=1).tolist(),
            "predictions_test": np.argmax(x_test @ coef.T + intercept, axis=1).tolist(),
        })
    doc = {
        "generator": "tests/golden/make_ridge_golden.py (numpy %s)" % np.__version__,
        "n_classes": n_classes,
        "x": x.tolist(),
        "y": y.tolist(),
        "x_test": x_test.tolist(),
        "cases": cases,
    }
    with open("tests/golden/ridge_small.json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
