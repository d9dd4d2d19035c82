"""Gene-set enrichment of SparseVAE factors (gseapy, offline)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ._anchors import FitData
from ._results import DEFAULT_KEY, check_min_pstar, read_results

__all__ = ["enrich", "read_gmt", "translate_gene_sets"]

logger = logging.getLogger(__name__)

GeneSets = Mapping[str, Sequence[str]]
GeneSetsInput = str | os.PathLike | GeneSets | Sequence[str | os.PathLike | GeneSets]

_ORA_COLUMNS = [
    "factor",
    "gene_set",
    "term",
    "overlap",
    "set_size",
    "n_query",
    "odds_ratio",
    "pvalue",
    "fdr",
    "genes",
]
_PRERANK_COLUMNS = [
    "factor",
    "gene_set",
    "term",
    "overlap",
    "set_size",
    "es",
    "nes",
    "pvalue",
    "fdr",
    "genes",
]


# ---------------------------------------------------------------------------- gene sets
def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file of gene sets.

    Parameters
    ----------
    path
        Path of a GMT file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``.

    Returns
    -------
    ``{name: [genes]}`` in file order (empty gene names dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GMT file at {path}.")
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start : err.end]!r}). "
            "GMT files are UTF-8; convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`."
        ) from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t")
        name = parts[0].strip()
        if not name:
            continue
        if len(parts) < 2:
            raise ValueError(
                f"{path}:{line_no} is not a GMT line (name<TAB>description<TAB>genes...)."
            )
        if name in sets:
            raise ValueError(
                f"{path}:{line_no} repeats the gene set name {name!r} (first on line "
                f"{first_line[name]}). Set names must be unique; rename or merge the sets."
            )
        first_line[name] = line_no
        sets[name] = [g.strip() for g in parts[2:] if g.strip()]
    return sets


def _load_libraries(gene_sets: GeneSetsInput) -> list[tuple[str, dict[str, list[str]]]]:
    """Normalise the accepted inputs into a list of (library name, {term: genes})."""
    if isinstance(gene_sets, str | os.PathLike | Mapping):
        items: list[Any] = [gene_sets]
    elif isinstance(gene_sets, Sequence):
        items = list(gene_sets)
    else:
        raise TypeError(
            "gene_sets must be a GMT path, a {name: [genes]} dict, or a list of them; got "
            f"{type(gene_sets).__name__}."
        )
    if not items:
        raise ValueError("gene_sets is empty.")
    libraries: list[tuple[str, dict[str, list[str]]]] = []
    for i, item in enumerate(items):
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Gene set file {os.fspath(item)!r} not found. Pass a local GMT file or a "
                    "{name: [genes]} dict (Enrichr library names need the network and are not "
                    "supported)."
                )
            name = path.name
            for suffix in (".gmt", ".txt"):
                name = name.removesuffix(suffix)
            libraries.append((name, read_gmt(path)))
        elif isinstance(item, Mapping):
            sets: dict[str, list[str]] = {}
            for term, genes in item.items():
                if isinstance(genes, str):
                    raise TypeError(
                        f"Gene set {term!r} must be a list of genes, got the string {genes!r}."
                    )
                sets[str(term)] = [str(g) for g in genes]
            libraries.append((f"gene_sets_{i}" if len(items) > 1 else "gene_sets", sets))
        else:
            raise TypeError(
                f"Each gene set library must be a GMT path or a dict, got {type(item).__name__}."
            )
    empty = [name for name, sets in libraries if not sets]
    if empty:
        raise ValueError(
            f"No gene sets in {', '.join(empty)}: the dict or GMT file is empty. Pass at least "
            "one gene set ({name: [genes]} or a GMT file with one set per line)."
        )
    names = [n for n, _ in libraries]
    if len(set(names)) < len(names):  # same file name twice: make them unique
        libraries = [(f"{n}_{i}", s) for i, (n, s) in enumerate(libraries)]
    return libraries


def translate_gene_sets(
    gene_sets: GeneSetsInput,
    ortholog_table: pd.DataFrame | str | os.PathLike,
    from_col: str | int = 0,
    to_col: str | int = 1,
    header: int | Literal["infer"] | None = "infer",
    min_genes: int = 1,
) -> dict[str, list[str]]:
    """Translate gene sets to another species with an ortholog table (e.g. human to mouse).

    Genes are matched to the table's ``from_col`` case-insensitively; a gene with several
    orthologs maps to all of them, a gene without one (missing or empty ``to_col``) is dropped.

    Parameters
    ----------
    gene_sets
        A GMT path, a ``{name: [genes]}`` dict, or a list of them (merged into one dict).
    ortholog_table
        DataFrame, or path of a CSV/TSV file (optionally gzipped; tab-separated when the name
        ends in ``.tsv`` or ``.txt``, comma-separated otherwise), with one ortholog pair per row.
        E.g. an Ensembl BioMart export with human and mouse gene symbols.
    from_col
        Column of the source species' gene names: a name, or a position.
    to_col
        Column of the target species' gene names: a name, or a position.
    header
        For a path: row of the column names, ``None`` for a file without header. ``"infer"``:
        ``0`` when ``from_col`` and ``to_col`` are names, ``None`` when they are positions.
    min_genes
        Drop translated sets with fewer genes.

    Returns
    -------
    ``{name: [translated genes]}``, genes in the order of the source set, without duplicates.

    Examples
    --------
    >>> mouse_sets = sparsevae.tl.translate_gene_sets(
    ...     "h.all.v7.5.1.symbols.gmt", "Ensembl105_Human2Mouse_Genes.csv.gz"
    ... )
    >>> sparsevae.tl.enrich(model, mouse_sets)
    """
    if isinstance(ortholog_table, str | os.PathLike):
        path = Path(ortholog_table)
        if not path.is_file():
            raise FileNotFoundError(f"No ortholog table at {path}.")
        if header == "infer":
            header = 0 if isinstance(from_col, str) and isinstance(to_col, str) else None
        stem = path.name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".zip")
        sep = "\t" if stem.endswith((".tsv", ".txt", ".tab")) else ","
        table = pd.read_csv(path, sep=sep, header=header, dtype=str, keep_default_na=False)
    elif isinstance(ortholog_table, pd.DataFrame):
        table = ortholog_table
    else:
        raise TypeError(
            f"ortholog_table must be a DataFrame or a path, got {type(ortholog_table).__name__}."
        )

    def column(col: str | int) -> pd.Series:
        if col in table.columns:
            return table[col]
        if isinstance(col, int | np.integer) and -table.shape[1] <= col < table.shape[1]:
            return table.iloc[:, int(col)]
        raise KeyError(f"Column {col!r} is not in the ortholog table ({list(table.columns)}).")

    src = column(from_col).astype(object)
    dst = column(to_col).astype(object)
    mapping: dict[str, list[str]] = {}
    for s, d in zip(src, dst, strict=True):
        if not isinstance(s, str) or not isinstance(d, str):
            continue
        s, d = s.strip(), d.strip()
        if s and d:
            targets = mapping.setdefault(s.upper(), [])
            if d not in targets:
                targets.append(d)
    if not mapping:
        raise ValueError("The ortholog table has no non-empty pairs in the given columns.")

    out: dict[str, list[str]] = {}
    for _, sets in _load_libraries(gene_sets):
        for term, genes in sets.items():
            translated = list(
                dict.fromkeys(t for g in genes for t in mapping.get(str(g).strip().upper(), []))
            )
            if len(translated) < min_genes:
                continue
            if term in out and out[term] != translated:
                raise ValueError(f"Gene set {term!r} appears twice with different genes.")
            out[term] = translated
    if not out:
        raise ValueError(
            "No gene of any set has an ortholog in the table: check from_col/to_col and that the "
            "sets use the table's source identifiers."
        )
    return out


class _GeneIndex:
    """Case-insensitive matching of gene names to the model's genes.

    gseapy gets opaque upper-case tokens (``G0``, ``G1``, ...) for the model's genes, so that its
    own upper-casing heuristics cannot break the match; results are mapped back to the names.
    """

    def __init__(self, genes: Sequence[str]) -> None:
        self.genes = np.asarray(genes).astype(str)
        self.tokens = np.array([f"G{i}" for i in range(len(self.genes))])
        self.token_to_gene = dict(zip(self.tokens, self.genes, strict=True))
        self.by_upper: dict[str, list[int]] = {}
        for i, g in enumerate(self.genes):
            self.by_upper.setdefault(g.upper(), []).append(i)

    def match(self, genes: Sequence[str]) -> list[int]:
        """Positions of the model's genes matching ``genes``, sorted, without duplicates."""
        hits = {i for g in genes for i in self.by_upper.get(str(g).strip().upper(), [])}
        return sorted(hits)

    def names(self, tokens: str) -> str:
        """Translate a ``;``-separated token list back to gene names."""
        if not isinstance(tokens, str) or not tokens:
            return ""
        return ";".join(self.token_to_gene.get(t, t) for t in tokens.split(";"))


def _matched_libraries(
    libraries: list[tuple[str, dict[str, list[str]]]], index: _GeneIndex
) -> list[tuple[str, dict[str, list[int]]]]:
    matched = [
        (name, {term: index.match(genes) for term, genes in sets.items()})
        for name, sets in libraries
    ]
    n_hits = sum(len(v) for _, sets in matched for v in sets.values())
    if n_hits == 0:
        example_set = next((g for _, s in libraries for g in s.values() if g), [])[:3]
        raise ValueError(
            "No gene of any gene set matches the model's genes (compared case-insensitively), "
            f"e.g. set genes {list(example_set)} vs model genes {list(index.genes[:3])}. Check "
            "the species (translate human sets with sparsevae.tl.translate_gene_sets) and the "
            "identifier type (symbols vs Ensembl IDs)."
        )
    return matched


def _size_filter(sets: dict[str, list[int]], min_size: int, max_size: int) -> dict[str, list[int]]:
    return {t: g for t, g in sets.items() if min_size <= len(g) <= max_size}


def _bh(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values."""
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.clip(adjusted, 0.0, 1.0)
    return out


# ---------------------------------------------------------------------------- enrichment
def _ora_factor(
    factor: str,
    query: list[int],
    libraries: list[tuple[str, dict[str, list[int]]]],
    index: _GeneIndex,
) -> list[pd.DataFrame]:
    import gseapy

    background = list(index.tokens)
    query_tokens = [index.tokens[i] for i in query]
    frames = []
    for lib_name, sets in libraries:
        if not sets:
            continue
        hits = pd.DataFrame(columns=["Term", "P-value", "Odds Ratio", "Genes"])
        query_set = set(query)
        if any(query_set.intersection(g) for g in sets.values()):
            token_sets = {t: [index.tokens[i] for i in g] for t, g in sets.items()}
            res = gseapy.enrich(
                gene_list=query_tokens,
                gene_sets=token_sets,
                background=background,
                outdir=None,
                cutoff=1.0,
                no_plot=True,
                verbose=False,
            )
            table = getattr(res, "res2d", None)
            if isinstance(table, pd.DataFrame) and len(table):
                hits = table
        # One row per tested set; sets without overlap (left out by gseapy) get p = 1, so the
        # FDR is adjusted over every set tested, not only those with a hit.
        df = pd.DataFrame({"term": list(sets), "set_size": [len(g) for g in sets.values()]})
        hits = hits.set_index("Term")
        df["pvalue"] = df["term"].map(hits["P-value"]).astype(float).fillna(1.0)
        df["odds_ratio"] = df["term"].map(hits["Odds Ratio"]).astype(float)
        df["genes"] = df["term"].map(hits["Genes"]).fillna("").map(index.names)
        df["overlap"] = [len(g.split(";")) if g else 0 for g in df["genes"]]
        df["fdr"] = _bh(df["pvalue"].to_numpy())
        df["factor"] = factor
        df["gene_set"] = lib_name
        df["n_query"] = len(query)
        frames.append(df[df["overlap"] > 0])
    return frames


def _prerank_factor(
    factor: str,
    scores: np.ndarray,
    libraries: list[tuple[str, dict[str, list[int]]]],
    index: _GeneIndex,
    min_size: int,
    max_size: int,
    permutation_num: int,
    seed: int,
    threads: int,
    **kwargs: Any,
) -> list[pd.DataFrame]:
    import gseapy

    finite = np.isfinite(scores)
    rnk = pd.Series(scores[finite], index=index.tokens[finite], name=factor)
    rnk = rnk.sort_values(ascending=False)
    frames = []
    for lib_name, sets in libraries:
        if not sets:
            continue
        token_sets = {t: [index.tokens[i] for i in g] for t, g in sets.items()}
        try:
            res = gseapy.prerank(
                rnk=rnk,
                gene_sets=token_sets,
                min_size=min_size,
                max_size=max_size,
                permutation_num=permutation_num,
                seed=seed,
                threads=threads,
                outdir=None,
                no_plot=True,
                verbose=False,
                **kwargs,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # gseapy's Rust core panics (a BaseException) on bad input
            n_tied = int(rnk.duplicated(keep=False).sum())
            raise RuntimeError(
                f"gseapy.prerank failed for {factor!r} with gene set library {lib_name!r}: "
                f"{type(err).__name__}: {err}. {n_tied} of {len(rnk)} ranking scores are tied; "
                "prerank needs a ranking with few ties (e.g. signed gene effects rather than "
                "values that are exactly 0 for most genes). Use method='ora' for the selected "
                "genes, or rank on other scores."
            ) from err
        table = res.res2d
        if table is None or len(table) == 0:
            continue
        genes = table["Lead_genes"].map(index.names)
        df = pd.DataFrame(
            {
                "factor": factor,
                "gene_set": lib_name,
                "term": table["Term"].astype(str).to_numpy(),
                "overlap": [len(g.split(";")) if g else 0 for g in genes],
                "set_size": [len(sets.get(t, [])) for t in table["Term"].astype(str)],
                "es": pd.to_numeric(table["ES"], errors="coerce").to_numpy(),
                "nes": pd.to_numeric(table["NES"], errors="coerce").to_numpy(),
                "pvalue": pd.to_numeric(table["NOM p-val"], errors="coerce").to_numpy(),
                "fdr": pd.to_numeric(table["FDR q-val"], errors="coerce").to_numpy(),
                "genes": genes.to_numpy(),
            }
        )
        frames.append(df)
    return frames


def enrich(
    data: FitData,
    gene_sets: GeneSetsInput,
    method: Literal["ora", "prerank"] = "ora",
    factors: Sequence[str | int] | str | int | None = None,
    min_pstar: float = 0.5,
    min_size: int = 5,
    max_size: int = 500,
    permutation_num: int = 1000,
    seed: int = 0,
    effects: pd.DataFrame | None = None,
    effect_scale: Literal["link", "expression"] | None = None,
    threads: int = 1,
    kind: str | None = None,
    *,
    key: str = DEFAULT_KEY,
    **kwargs: Any,
) -> pd.DataFrame:
    """Gene-set enrichment of each factor, offline with gseapy.

    ``method="ora"``: over-representation (hypergeometric test, :func:`gseapy.enrich`) of the
    genes that the factor's mask selects (``p* >= min_pstar``) against all the model's genes as
    background. ``method="prerank"``: GSEA preranked (:func:`gseapy.prerank`) on all genes ranked
    by their signed effect from the factor (:meth:`~sparsevae.SparseVAE.get_gene_effects`).

    Gene names of the sets are matched to the model's genes case-insensitively; gene sets are
    restricted to the model's genes before the size filter.

    Parameters
    ----------
    data
        An AnnData with results (``model.write_results(adata)``) or a trained
        :class:`~sparsevae.SparseVAE`; with a mask prior for ``"ora"``.
    gene_sets
        A local GMT path, a ``{name: [genes]}`` dict, or a list of them. For data of another
        species, translate the sets first with :func:`translate_gene_sets`.
    method
        ``"ora"`` or ``"prerank"``.
    factors
        Factors to test (names or integer positions); default all.
    min_pstar
        ``"ora"``: threshold on the inclusion probability ``p*`` defining a factor's genes.
    min_size, max_size
        Test only sets with this many of the model's genes.
    permutation_num
        ``"prerank"``: number of permutations.
    seed
        ``"prerank"``: random seed of the permutations.
    effects
        ``"prerank"``: precomputed genes x factors effects (e.g. ``model.get_gene_effects()``);
        computed when ``None``.
    effect_scale
        ``"prerank"``, when ``effects`` is ``None``: scale of the effects, see
        ``get_gene_effects``. Default: ``"link"`` from a model (counts ranked by log fold change
        per unit of the factor; expression-scale effects favour highly expressed genes), the
        stored effects (``"expression"``) from an AnnData.
    threads
        ``"prerank"``: threads used by gseapy.
    kind
        Multi-study models: which mask's factors to test, ``None``/``"shared"`` (default) or a
        study name (its specific factors; effects averaged over its cells), see
        :meth:`~sparsevae.SparseVAE.get_mask`.
    key
        The ``key_added`` the results were written with (AnnData only).
    **kwargs
        Passed to :func:`gseapy.prerank` (e.g. ``weight``).

    Returns
    -------
    Tidy DataFrame, one row per (factor, gene set) with at least one overlapping gene, sorted by
    factor then p-value, with the columns ``factor``, ``gene_set`` (the library: GMT file name or
    ``gene_sets``), ``term``, ``overlap``, ``set_size`` (set genes among the model's genes),
    ``pvalue``, ``fdr`` and ``genes`` (``;``-separated model gene names), and

    - for ``"ora"``: ``n_query`` (genes selected by the factor) and ``odds_ratio``; ``overlap``
      counts the selected genes in the set and ``fdr`` is Benjamini-Hochberg over all sets
      tested for the factor within a library (including sets without overlap);
    - for ``"prerank"``: ``es`` and ``nes`` (normalised enrichment score; positive when the
      factor turns the set up); ``overlap`` and ``genes`` describe the leading edge, ``pvalue``
      is gseapy's nominal permutation p-value (0 means below ``1 / permutation_num``) and
      ``fdr`` its FDR q-value.

    Factors that select no gene are absent from ``"ora"`` results.

    Examples
    --------
    >>> enr = sparsevae.tl.enrich(model, "h.all.v7.5.1.symbols.gmt")
    >>> enr[enr.fdr < 0.05].groupby("factor").head(3)
    >>> gsea = sparsevae.tl.enrich(model, "h.all.v7.5.1.symbols.gmt", method="prerank")
    """
    if method not in ("ora", "prerank"):
        raise ValueError(f"method must be 'ora' or 'prerank', got {method!r}.")
    res = read_results(data, key)
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) must not exceed max_size ({max_size}).")
    factor_list = res.resolve_factors(factors, kind)
    index = _GeneIndex(list(res.genes))
    libraries = _matched_libraries(_load_libraries(gene_sets), index)
    libraries = [(n, _size_filter(s, int(min_size), int(max_size))) for n, s in libraries]
    if not any(sets for _, sets in libraries):
        raise ValueError(
            f"No gene set has between min_size={min_size} and max_size={max_size} of the model's "
            f"{len(index.genes)} genes; lower min_size."
        )
    frames: list[pd.DataFrame] = []
    if method == "ora":
        res.require_prior("enrich(method='ora')")
        selected = res.selected(kind, check_min_pstar(min_pstar))
        for factor in factor_list:
            query = np.flatnonzero(selected[factor].to_numpy()).tolist()
            if not query:
                logger.info("Factor %s selects no gene: skipped.", factor)
                continue
            frames.extend(_ora_factor(factor, query, libraries, index))
        columns = _ORA_COLUMNS
    else:
        if not isinstance(permutation_num, int | np.integer) or permutation_num < 1:
            raise ValueError(
                f"permutation_num must be a positive integer, got {permutation_num!r}."
            )
        if effects is None and res.model is not None:
            effects = res.model.get_gene_effects(scale=effect_scale or "link", kind=kind)
        elif effects is None:
            if effect_scale == "link":
                raise ValueError(
                    "The stored gene effects are on the expression scale; link-scale effects "
                    "need the network. Pass the model, or effect_scale=None for the stored ones."
                )
            effects = res.effects(kind)
        if not isinstance(effects, pd.DataFrame):
            raise TypeError("effects must be a genes x factors DataFrame.")
        missing = [f for f in factor_list if f not in effects.columns]
        if missing:
            raise ValueError(f"effects has no column for factor(s) {missing}.")
        if not pd.Index(effects.index.astype(str)).equals(pd.Index(index.genes)):
            try:
                effects = effects.reindex(index.genes)
            except ValueError as err:  # duplicated index
                raise ValueError("effects must be indexed by the model's genes.") from err
            if effects[factor_list].isna().all().all():
                raise ValueError("effects must be indexed by the model's genes.")
        for factor in factor_list:
            scores = effects[factor].to_numpy(dtype=float)
            frames.extend(
                _prerank_factor(
                    factor,
                    scores,
                    libraries,
                    index,
                    int(min_size),
                    int(max_size),
                    int(permutation_num),
                    int(seed),
                    int(threads),
                    **kwargs,
                )
            )
        columns = _PRERANK_COLUMNS
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)[columns]
    order = {f: i for i, f in enumerate(factor_list)}
    # Within a factor: smallest p-value first; ties (frequent for permutation p-values) broken by
    # the strength of the enrichment.
    strength = -out["nes"].abs() if method == "prerank" else -out["odds_ratio"]
    out = out.assign(_order=out["factor"].map(order), _strength=strength.fillna(0.0))
    out = out.sort_values(["_order", "pvalue", "_strength", "term"], kind="stable")
    out = out.drop(columns=["_order", "_strength"])
    out["overlap"] = out["overlap"].astype(int)
    out["set_size"] = out["set_size"].astype(int)
    return out.reset_index(drop=True)
