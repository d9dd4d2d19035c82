"""Simulators with known factors and masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["simulate_ivae", "simulate_moran2022", "simulate_multistudy", "simulate_programs"]


def simulate_moran2022(
    n_cells: int = 1000, rho: float = 0.0, noise: float = 0.5, seed: int = 0
) -> AnnData:
    """The synthetic design of Moran et al. (2022): 7 features driven by 2 correlated factors.

    ``z ~ N(0, [[1, rho], [rho, 1]])``; ``x1 = z1``, ``x2 = 2 z1``, ``x3 = 3 z1^2``, ``x4 = 4 z2``,
    ``x5 = 5 z2``, ``x6 = 6 sin(z2)``, ``x7 = 7 z1 z2``, each plus ``N(0, noise^2)``.

    Parameters
    ----------
    n_cells
        Number of observations.
    rho
        Correlation between the two factors, in ``(-1, 1)``.
    noise
        Standard deviation of the Gaussian noise.
    seed
        Random seed.

    Returns
    -------
    AnnData with the features in ``X``, the true factors in ``obsm["true_factors"]`` and the true
    7 x 2 mask in ``varm["true_mask"]``.
    """
    if not -1 < rho < 1:
        raise ValueError(f"rho must be in (-1, 1), got {rho}.")
    if n_cells < 1 or noise < 0:
        raise ValueError("n_cells must be >= 1 and noise >= 0.")
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, rho], [rho, 1.0]])
    z = rng.multivariate_normal(np.zeros(2), cov, size=n_cells)
    z1, z2 = z[:, 0], z[:, 1]
    x = np.stack([z1, 2 * z1, 3 * z1**2, 4 * z2, 5 * z2, 6 * np.sin(z2), 7 * z1 * z2], axis=1)
    x = x + rng.normal(0.0, noise, size=x.shape)
    mask = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=np.float32)
    adata = AnnData(
        X=x.astype(np.float32),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"x{j + 1}" for j in range(7)]),
    )
    adata.obsm["true_factors"] = z.astype(np.float32)
    adata.varm["true_mask"] = mask
    adata.uns["simulation"] = {"design": "moran2022", "rho": rho, "noise": noise, "seed": seed}
    return adata


def simulate_programs(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_factors: int = 8,
    genes_per_program: int = 30,
    n_shared_genes: int = 5,
    effect: float = 1.0,
    nonlinear: bool = True,
    mean_library: float = 5000.0,
    dispersion: float = 10.0,
    seed: int = 0,
) -> AnnData:
    """Counts from planted sparse gene programs with nonlinear maps (negative binomial).

    Factor ``k`` drives a program of ``genes_per_program`` genes. Most are anchors (in no other
    program); ``n_shared_genes`` of them also belong to the next factor's program. Genes outside
    every program have constant expression. For gene ``j``,
    ``log mu_ij = base_j + log l_i + sum_{k in program(j)} s_jk * g_jk(z_ik)`` with sign
    ``s_jk = +-1``, magnitude ``effect`` and ``g`` linear, or (``nonlinear``) one of
    ``z``, ``softplus(z)-0.7``, ``tanh(z)`` per gene.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes (at least ``n_factors * genes_per_program``).
    n_factors
        Number of true factors.
    genes_per_program
        Genes per program (anchors plus shared genes).
    n_shared_genes
        Genes of each program that also load on the next factor.
    effect
        Magnitude of the factor effects on the log scale.
    nonlinear
        Use nonlinear maps.
    mean_library
        Mean total count per cell.
    dispersion
        Negative binomial inverse dispersion ``theta``.
    seed
        Random seed.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR) and ``layers["counts"]``, true factors in
    ``obsm["true_factors"]``, the true mask in ``varm["true_mask"]``, signed effects in
    ``varm["true_effect_sign"]``, and ``var["program"]`` (factor index, -1 for none) and
    ``var["is_anchor"]``.
    """
    if n_genes < n_factors * genes_per_program:
        raise ValueError(
            f"n_genes ({n_genes}) must be at least n_factors * genes_per_program "
            f"({n_factors * genes_per_program})."
        )
    if not 0 <= n_shared_genes < genes_per_program:
        raise ValueError("n_shared_genes must be in [0, genes_per_program).")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_cells, n_factors))
    mask = np.zeros((n_genes, n_factors), dtype=np.float32)
    program = np.full(n_genes, -1)
    for k in range(n_factors):
        genes = np.arange(k * genes_per_program, (k + 1) * genes_per_program)
        mask[genes, k] = 1
        program[genes] = k
        if n_shared_genes and n_factors > 1:
            mask[genes[-n_shared_genes:], (k + 1) % n_factors] = 1
    sign = np.where(rng.random((n_genes, n_factors)) < 0.5, -1.0, 1.0) * mask
    kind = rng.integers(0, 3 if nonlinear else 1, size=(n_genes, n_factors))
    maps = np.stack([z, np.logaddexp(0.0, z) - 0.7, np.tanh(z) * 1.5], axis=0)  # (3, n_cells, K)
    base = rng.normal(np.log(mean_library / n_genes), 1.0, size=n_genes)
    log_mu = np.tile(base, (n_cells, 1))
    for k in range(n_factors):
        genes = np.flatnonzero(mask[:, k])
        log_mu[:, genes] += effect * sign[genes, k] * maps[kind[genes, k], :, k].T
    library = rng.lognormal(0.0, 0.3, size=n_cells) * mean_library
    mu = np.exp(log_mu)
    mu = mu / mu.sum(1, keepdims=True) * library[:, None]
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    X = sp.csr_matrix(counts)
    var = pd.DataFrame(
        {"program": program, "is_anchor": mask.sum(1) == 1},
        index=[f"gene{j:04d}" for j in range(n_genes)],
    )
    adata = AnnData(X=X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]), var=var)
    adata.layers["counts"] = X.copy()
    adata.obsm["true_factors"] = z.astype(np.float32)
    adata.varm["true_mask"] = mask
    adata.varm["true_effect_sign"] = sign.astype(np.float32)
    adata.uns["simulation"] = {
        "design": "programs",
        "n_factors": n_factors,
        "genes_per_program": genes_per_program,
        "seed": seed,
    }
    return adata


def simulate_multistudy(
    n_studies: int = 3,
    n_genes: int = 300,
    n_shared: int = 4,
    n_specific: int = 2,
    n_cells_per_study: int = 500,
    genes_per_program: int = 20,
    n_cell_types: int = 4,
    effect: float = 1.0,
    nonlinear: bool = True,
    mean_library: float = 5000.0,
    dispersion: float = 10.0,
    seed: int = 0,
) -> AnnData:
    """Counts from several studies with shared and study-specific gene programs.

    Every study has the same genes. ``n_shared`` programs are active in every study, and each
    study has ``n_specific`` programs of its own that are active in that study only. Programs
    have disjoint genes (``genes_per_program`` each); the remaining genes have constant
    expression. Cell ``i`` of study ``s`` has shared factors ``z_shared`` (a mixture over
    ``n_cell_types`` cell types, the same types in every study, whitened to mean 0 and identity
    covariance over all cells) and specific factors ``z_specific ~ N(0, I)``; for gene ``j``,
    ``log mu_ij = base_j + log l_i + sum_{k in program(j)} effect * s_jk * g_jk(z_ik)`` where the
    sum runs over the shared program of ``j``, or over ``j``'s specific program when ``i`` is
    from the program's study (otherwise the gene stays at its base level). ``s_jk = +-1`` and
    ``g`` is, per gene, one of ``z``, ``softplus(z) - 0.7``, ``1.5 tanh(z)`` (``nonlinear``) or
    ``z``. Library sizes differ between studies (as between technologies). Counts are negative
    binomial.

    Parameters
    ----------
    n_studies
        Number of studies (at least 2).
    n_genes
        Number of genes, at least ``(n_shared + n_studies * n_specific) * genes_per_program``.
    n_shared
        Programs active in every study.
    n_specific
        Programs per study that are active in that study only.
    n_cells_per_study
        Cells per study.
    genes_per_program
        Genes per program.
    n_cell_types
        Cell types; each has its own mean of the shared factors.
    effect
        Magnitude of the factor effects on the log scale.
    nonlinear
        Use nonlinear maps.
    mean_library
        Mean total count per cell (each study's mean varies around it).
    dispersion
        Negative binomial inverse dispersion ``theta``.
    seed
        Random seed.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR) and ``layers["counts"]``, and the truth:

    - ``obs["study"]`` (categorical ``study_0``, ``study_1``, ...) and ``obs["cell_type"]``;
    - ``obsm["true_factors"]``: ``(n_cells, n_shared + n_specific)``, shared then specific
      factors (the layout of :meth:`SparseVAE.get_latent_representation`);
    - ``varm["true_mask_shared"]`` (genes x ``n_shared``) and, per study,
      ``varm[f"true_mask_{study}"]`` (genes x ``n_specific``);
    - ``var["program"]`` (``shared_k``, ``<study>:specific_k`` or ``none``) and ``var["truth"]``
      (``shared``, ``specific to <study>`` or ``none``, the labels of
      :func:`sparsevae.tl.shared_specific_genes`);
    - ``uns["simulation"]``: the settings and the list of studies.
    """
    if n_studies < 2:
        raise ValueError(f"n_studies must be at least 2, got {n_studies}.")
    if n_shared < 1 or n_specific < 1:
        raise ValueError(f"n_shared and n_specific must be >= 1, got {n_shared}, {n_specific}.")
    n_programs = n_shared + n_studies * n_specific
    if n_genes < n_programs * genes_per_program:
        raise ValueError(
            f"n_genes ({n_genes}) must be at least (n_shared + n_studies * n_specific) * "
            f"genes_per_program ({n_programs * genes_per_program})."
        )
    if n_cells_per_study < 1 or n_cell_types < 1:
        raise ValueError("n_cells_per_study and n_cell_types must be >= 1.")
    rng = np.random.default_rng(seed)
    studies = [f"study_{s}" for s in range(n_studies)]
    n_cells = n_studies * n_cells_per_study
    study = np.repeat(np.arange(n_studies), n_cells_per_study)

    # Shared factors: cell-type means plus within-type spread, whitened overall (mean 0,
    # identity covariance: the cell types do not correlate the factors).
    type_means = rng.normal(0.0, 1.0, size=(n_cell_types, n_shared))
    cell_type = rng.integers(0, n_cell_types, size=n_cells)
    z_shared = type_means[cell_type] + 0.6 * rng.standard_normal((n_cells, n_shared))
    z_shared = z_shared - z_shared.mean(0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(z_shared, rowvar=False)))
    z_shared = np.linalg.solve(chol, z_shared.T).T
    z_specific = rng.standard_normal((n_cells, n_specific))

    mask_shared = np.zeros((n_genes, n_shared), dtype=np.float32)
    mask_specific = np.zeros((n_studies, n_genes, n_specific), dtype=np.float32)
    program = np.array(["none"] * n_genes, dtype=object)
    truth = np.array(["none"] * n_genes, dtype=object)
    start = 0
    for k in range(n_shared):
        genes = np.arange(start, start + genes_per_program)
        mask_shared[genes, k] = 1
        program[genes] = f"shared_{k}"
        truth[genes] = "shared"
        start += genes_per_program
    for s in range(n_studies):
        for k in range(n_specific):
            genes = np.arange(start, start + genes_per_program)
            mask_specific[s, genes, k] = 1
            program[genes] = f"{studies[s]}:specific_{k}"
            truth[genes] = f"specific to {studies[s]}"
            start += genes_per_program

    def programme_effect(mask: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Sum over factors of effect * sign * g(z), shape (cells, genes)."""
        n_factors = mask.shape[1]
        sign = np.where(rng.random((n_genes, n_factors)) < 0.5, -1.0, 1.0) * mask
        kind = rng.integers(0, 3 if nonlinear else 1, size=(n_genes, n_factors))
        maps = np.stack([z, np.logaddexp(0.0, z) - 0.7, np.tanh(z) * 1.5], axis=0)
        out = np.zeros((z.shape[0], n_genes))
        for k in range(n_factors):
            genes = np.flatnonzero(mask[:, k])
            out[:, genes] += effect * sign[genes, k] * maps[kind[genes, k], :, k].T
        return out

    base = rng.normal(np.log(mean_library / n_genes), 1.0, size=n_genes)
    log_mu = base + programme_effect(mask_shared, z_shared)
    for s in range(n_studies):
        cells = study == s
        log_mu[cells] += programme_effect(mask_specific[s], z_specific[cells])
    study_library = mean_library * np.exp(rng.normal(0.0, 0.3, size=n_studies))
    library = rng.lognormal(0.0, 0.3, size=n_cells) * study_library[study]
    mu = np.exp(log_mu)
    mu = mu / mu.sum(1, keepdims=True) * library[:, None]
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    X = sp.csr_matrix(counts)
    obs = pd.DataFrame(
        {
            "study": pd.Categorical([studies[s] for s in study], categories=studies),
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"program": program.astype(str), "truth": truth.astype(str)},
        index=[f"gene{j:04d}" for j in range(n_genes)],
    )
    adata = AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.obsm["true_factors"] = np.hstack([z_shared, z_specific]).astype(np.float32)
    adata.varm["true_mask_shared"] = mask_shared
    for s, name in enumerate(studies):
        adata.varm[f"true_mask_{name}"] = mask_specific[s]
    adata.uns["simulation"] = {
        "design": "multistudy",
        "studies": studies,
        "n_shared": n_shared,
        "n_specific": n_specific,
        "genes_per_program": genes_per_program,
        "n_cell_types": n_cell_types,
        "effect": effect,
        "seed": seed,
    }
    return adata


def simulate_ivae(
    n_per_segment: int = 100,
    n_segments: int = 40,
    n_sources: int = 5,
    n_features: int = 20,
    n_layers: int = 3,
    noise: float = 0.1,
    seed: int = 0,
) -> AnnData:
    """Non-stationary sources mixed by a random invertible network (the iVAE's simulation design).

    Khemakhem et al. (AISTATS 2020), section 6: the ``n_sources`` sources are Gaussian with a
    mean and a standard deviation that change from segment to segment, ``s_ik ~ N(mu_mk,
    sigma_mk^2)`` for a cell ``i`` of segment ``m`` (``mu ~ U(-3, 3)``, ``sigma ~ U(0.5, 2)``),
    and are mixed by a random multilayer perceptron with leaky ReLU units (slope 0.2): a first
    layer with orthonormal columns (``n_sources`` -> ``n_features``), then square orthogonal
    layers, the last one linear, so the mixing is injective. ``x = f(s) + N(0, noise^2)``. The
    segment is the auxiliary variable ``u`` of ``latent_prior="conditional"``.

    Parameters
    ----------
    n_per_segment
        Observations per segment.
    n_segments
        Number of segments (values of ``u``).
    n_sources
        Number of sources (true factors).
    n_features
        Number of observed features (``>= n_sources``).
    n_layers
        Layers of the mixing network (``>= 1``).
    noise
        Standard deviation of the observation noise.
    seed
        Random seed.

    Returns
    -------
    AnnData with the features in ``X``, the segment in ``obs["segment"]`` (categorical) and the
    true sources in ``obsm["true_factors"]``.
    """
    if n_features < n_sources or n_sources < 1 or n_segments < 2 or n_layers < 1:
        raise ValueError(
            "Need n_features >= n_sources >= 1, n_segments >= 2 and n_layers >= 1, got "
            f"{n_features}, {n_sources}, {n_segments} and {n_layers}."
        )
    if n_per_segment < 1 or noise < 0:
        raise ValueError("n_per_segment must be >= 1 and noise >= 0.")
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-3.0, 3.0, size=(n_segments, n_sources))
    sigma = rng.uniform(0.5, 2.0, size=(n_segments, n_sources))
    segment = np.repeat(np.arange(n_segments), n_per_segment)
    s = mu[segment] + sigma[segment] * rng.normal(size=(len(segment), n_sources))

    def orthonormal(rows: int, cols: int) -> np.ndarray:
        q, r = np.linalg.qr(rng.normal(size=(rows, cols)))
        return q * np.sign(np.diag(r))

    h = s @ orthonormal(n_features, n_sources).T
    for _ in range(1, n_layers):
        h = np.where(h > 0, h, 0.2 * h)  # leaky ReLU: invertible
        h = h @ orthonormal(n_features, n_features).T
    if n_layers == 1:
        h = np.where(h > 0, h, 0.2 * h)
    x = h + rng.normal(0.0, noise, size=h.shape)
    adata = AnnData(
        X=x.astype(np.float32),
        obs=pd.DataFrame(
            {
                "segment": pd.Categorical(
                    [f"seg{m}" for m in segment], categories=[f"seg{m}" for m in range(n_segments)]
                )
            },
            index=[f"cell{i}" for i in range(len(segment))],
        ),
        var=pd.DataFrame(index=[f"x{j}" for j in range(n_features)]),
    )
    adata.obsm["true_factors"] = s.astype(np.float32)
    adata.uns["simulation"] = {
        "design": "ivae", "n_segments": n_segments, "n_sources": n_sources,
        "n_features": n_features, "n_layers": n_layers, "noise": noise, "seed": seed,
    }  # fmt: skip
    return adata
