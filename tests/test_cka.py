"""Linear CKA: 1 for a matrix with itself, invariant to orthogonal transforms, isotropic scaling and shifts (in
both the feature-space and the sample-space form), near 0 for independent data, matched by the matrix form, and
clear errors for input where it is undefined."""

from __future__ import annotations

import numpy as np
import pytest

from cos_core.analysis.cka import cka_matrix, linear_cka


@pytest.fixture(params=[(50, 8), (20, 64)], ids=["features<samples", "features>samples"])
def x(request):
    return np.random.default_rng(0).normal(size=request.param)


def test_identity_orthogonal_scale_and_shift(x):
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))[0]
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x + 3.0) == pytest.approx(1.0)
    assert linear_cka(x @ q, -0.1 * x) == pytest.approx(1.0)


def test_not_invariant_to_anisotropic_scaling_and_low_for_independent_data():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 10))
    stretched = x * np.array([10.0] + [0.1] * 9)
    assert linear_cka(x, stretched) < 0.5
    assert linear_cka(x, rng.normal(size=(500, 10))) < 0.05


def test_matrix_form_matches_pairs_and_symmetry():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(30, 5)) for _ in range(3)]
    ys = [xs[0] @ np.linalg.qr(rng.normal(size=(5, 5)))[0], rng.normal(size=(30, 40))]
    m = cka_matrix(xs, ys)
    assert m.shape == (3, 2) and m[0, 0] == pytest.approx(1.0)
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            assert m[i, j] == pytest.approx(linear_cka(a, b)) == pytest.approx(linear_cka(b, a))


def test_undefined_input_is_named():
    x = np.random.default_rng(4).normal(size=(10, 3))
    with pytest.raises(ValueError, match="x has 10 samples and y has 9"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="y is constant"):
        linear_cka(x, np.ones((10, 2)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in samples \[2\]"):
        linear_cka(bad, x)
    with pytest.raises(ValueError, match=">= 2 samples"):
        linear_cka(x[:1], x[:1])
    with pytest.raises(ValueError, match="same samples"):
        cka_matrix([x], [x[:5]])
