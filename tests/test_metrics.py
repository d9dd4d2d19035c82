import numpy as np
import pytest

import sparsevae


def _factors(n=600, k=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k))


def test_dci_importance_matrix_hand_built():
    # Diagonal importances: each code captures exactly one factor.
    d = sparsevae.tl.dci(np.zeros((5, 3)), np.zeros((5, 3)), importance_matrix=np.eye(3))
    assert d["disentanglement"] == pytest.approx(1.0)
    assert d["completeness"] == pytest.approx(1.0)
    assert np.isnan(d["informativeness"])
    # Uniform importances: every code captures every factor equally.
    u = sparsevae.tl.dci(np.zeros((5, 3)), np.zeros((5, 3)), importance_matrix=np.ones((3, 3)))
    assert u["disentanglement"] == pytest.approx(0.0, abs=1e-12)
    assert u["completeness"] == pytest.approx(0.0, abs=1e-12)
    # An unused code gets zero weight; a code split 50/50 between 2 factors scores 0.
    R = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    m = sparsevae.tl.dci(np.zeros((5, 3)), np.zeros((5, 2)), importance_matrix=R)
    np.testing.assert_allclose(m["disentanglement_per_code"][:2], [1.0, 0.0], atol=1e-12)
    assert m["disentanglement"] == pytest.approx(0.5)


def test_dci_perfect_code_is_disentangled():
    f = _factors()
    z = f[:, ::-1] * np.array([2.0, -0.5]) + 1.0  # permuted, rescaled, shifted
    d = sparsevae.tl.dci(z, f, n_estimators=50)
    assert d["disentanglement"] > 0.95
    assert d["completeness"] > 0.95
    assert d["informativeness"] > 0.9
    assert d["importance_matrix"].shape == (2, 2)
    # Code 0 predicts factor 1 and code 1 factor 0.
    assert d["importance_matrix"][0, 1] > 0.9 and d["importance_matrix"][1, 0] > 0.9


def test_dci_mixed_code_is_entangled():
    f = _factors()
    z = f @ (np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2))  # 45-degree rotation
    d = sparsevae.tl.dci(z, f, n_estimators=50)
    assert d["disentanglement"] < 0.3
    assert d["completeness"] < 0.3
    assert d["informativeness"] > 0.5  # still informative, just not disentangled


def test_dci_rejects_bad_input():
    f = _factors(50)
    with pytest.raises(ValueError, match="same number of rows"):
        sparsevae.tl.dci(f[:10], f)
    with pytest.raises(ValueError, match="at least two"):
        sparsevae.tl.dci(f, f[:, :1])
    with pytest.raises(ValueError, match="finite"):
        sparsevae.tl.dci(np.full_like(f, np.nan), f)
    with pytest.raises(ValueError, match="shape"):
        sparsevae.tl.dci(f, f, importance_matrix=np.ones((3, 2)))


def test_mcc_is_one_for_permuted_scaled_copies_and_low_for_noise():
    import sparsevae

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(500, 3))
    learned = np.column_stack(
        [-2 * truth[:, 2], truth[:, 0] + 1, 0.5 * truth[:, 1], rng.normal(size=500)]
    )
    res = sparsevae.tl.mcc(learned, truth)
    assert res["mcc"] > 0.999
    assert res["match"].tolist() == [1, 2, 0]
    monotone = np.column_stack([np.exp(truth[:, 0]), truth[:, 1] ** 3, truth[:, 2]])
    assert sparsevae.tl.mcc(monotone, truth, "spearman")["mcc"] > 0.999
    assert sparsevae.tl.mcc(monotone, truth)["mcc"] < 0.95  # Pearson sees the nonlinearity
    assert sparsevae.tl.mcc(rng.normal(size=(500, 3)), truth)["mcc"] < 0.2
    with pytest.raises(ValueError, match="at least as many learned factors"):
        sparsevae.tl.mcc(learned[:, :2], truth)
    with pytest.raises(ValueError, match="same cells"):
        sparsevae.tl.mcc(learned[:10], truth)
