"""Smoke test of the benchmark scripts: a tiny identifiability run and the report generator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: The Hallmark gene sets of the project's shared folder: the pbmc real-background runs plant them.
HALLMARK_GMT = ROOT.parent / "shared" / "genesets" / "h.all.v7.5.1.symbols.gmt"
needs_hallmark = pytest.mark.skipif(
    not HALLMARK_GMT.exists(), reason=f"needs {HALLMARK_GMT} (the project's shared folder)"
)


def test_identifiability_quick_json_lines_and_report(tmp_path):
    results = tmp_path / "results"
    out = results / "identifiability.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        str(BENCH / "identifiability.py"),
        "--quick",
        "--rhos",
        "0.4",
        "--epochs",
        "5",
        "--n-train",
        "200",
        "--n-test",
        "50",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records[0]["record"] == "meta"
    fits = [r for r in records if r["record"] == "fit"]
    sys.path.insert(0, str(BENCH))
    from identifiability import METHODS

    methods = set(METHODS)
    assert {"sparsevae", "sparsevae_corr", "vae", "beta_vae", "vsc"} <= methods
    assert {r["method"] for r in fits} == methods
    for r in fits:
        assert "error" not in r, r
        assert 0.0 <= r["dci_disentanglement"] <= 1.0
        assert r["heldout_mse"] >= 0
    assert sum(r["record"] == "summary" for r in records) == len(methods)
    # The file holds the same lines, and the report renders from it.
    assert len(out.read_text().splitlines()) == len(records)
    docs = tmp_path / "docs"
    rep = subprocess.run(
        [
            sys.executable,
            str(BENCH / "make_report.py"),
            "--results",
            str(results),
            "--docs",
            str(docs),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    text = (docs / "benchmarks.md").read_text()
    assert "DCI disentanglement" in text and "identifiability.py --quick" in text
    assert "Not run yet" in text  # zeisel and speed results are absent here


def test_merge_runs_keeps_other_methods_and_recomputes_summaries(tmp_path):
    """merge_runs: the re-run's fits (relabelled), the old run's other methods, fresh summaries."""
    sys.path.insert(0, str(BENCH))
    from merge_runs import merge

    settings = {"rhos": [0.4], "seeds": 1, "epochs": 5, "methods": ["sparsevae", "vae"]}

    def fit(method, dci):
        return {"record": "fit", "method": method, "rho": 0.4, "seed": 0,
                "dci_disentanglement": dci, "heldout_mse": 1.0}  # fmt: skip

    old = [
        {"record": "meta", "benchmark": "identifiability", "settings": settings, "note": "old"},
        fit("sparsevae", 0.5),
        fit("vae", 0.3),
    ]
    new = [
        {
            "record": "meta",
            "benchmark": "identifiability",
            "note": "new",
            "settings": {**settings, "methods": ["sparsevae"]},
        },
        fit("sparsevae", 0.9),
    ]
    merged = merge("identifiability", old, new, {"sparsevae": "sparsevae_corr"})
    fits = {r["method"]: r["dci_disentanglement"] for r in merged if r["record"] == "fit"}
    assert fits == {"sparsevae_corr": 0.9, "sparsevae": 0.5, "vae": 0.3}
    summaries = {r["method"]: r for r in merged if r["record"] == "summary"}
    assert set(summaries) == set(fits)
    assert summaries["sparsevae_corr"]["dci_disentanglement_mean"] == 0.9
    assert "relabelled 'sparsevae_corr'" in merged[0]["note"]

    # Stability lines: NEW's for the methods it ran (relabelled), OLD's for the methods kept;
    # partial ones (a run stopped early) are dropped; a differing --save-dir does not block.
    def stab(method, r, partial=False):
        return {"record": "stability", "method": method, "median_abs_r": r,
                **({"partial": True} if partial else {})}  # fmt: skip

    old_s = [*old, stab("sparsevae", 0.5), stab("vae", 0.3)]
    new_s = [*new, stab("sparsevae", 0.7, partial=True), stab("sparsevae", 0.9)]
    new_s[0] = {**new_s[0], "settings": {**new_s[0]["settings"], "save_dir": "/tmp/fits"}}
    merged = merge("identifiability", old_s, new_s, {"sparsevae": "sparsevae_corr"})
    stab_r = {r["method"]: r["median_abs_r"] for r in merged if r["record"] == "stability"}
    assert stab_r == {"sparsevae_corr": 0.9, "sparsevae": 0.5, "vae": 0.3}
    bad = [{**new[0], "settings": {**new[0]["settings"], "epochs": 300}}, *new[1:]]
    try:
        merge("identifiability", old, bad)
    except SystemExit as err:
        assert "epochs" in str(err)
    else:
        raise AssertionError("runs with different settings were merged")


def test_multistudy_report_shows_the_checks_verdict():
    """make_report's multi-study section: the last run per simulation size, a check column and
    the check's hit rate on misassigned and right fits (fits that lost everything apart)."""
    sys.path.insert(0, str(BENCH))
    from make_report import check_cell, multistudy_section

    def fit(seed, shared, specific, absorbed, problems, n_genes=240):
        return {
            "benchmark": "multistudy", "n_studies": 2, "seed": seed, "n_genes": n_genes,
            "n_shared": 2, "n_specific": 1, "n_cells_per_study": 300, "max_epochs": 100,
            "extra_factors": 1, "f1_shared": shared, "f1_specific": specific,
            "absorbed": absorbed, "check_ok": not problems, "check_problems": problems,
            "celltype_accuracy_shared": 0.7, "celltype_accuracy_true_factors": 0.8,
        }  # fmt: skip

    confined = ("shared factor shared_1 (30 genes) varies in study_1 but hardly in study_0 "
                "(spread 6.0x smaller): it probably carries a program of study_1")  # fmt: skip
    split = ("specific factors study_0:specific_1, study_1:specific_1 select the same 25 genes "
             "in every study: a shared program split over the study-specific masks")  # fmt: skip
    right = {"study_0": [1.0], "study_1": [0.98]}
    run = [
        {"record": "meta", "benchmark": "multistudy", "command": "multistudy.py --x"},
        fit(0, [1.0, 1.0], right, 0.0, []),
        fit(1, [1.0, 1.0], {"study_0": [1.0], "study_1": [0.0]}, 0.5, [confined]),
        fit(2, [1.0, 0.0], right, 0.0, [split]),
        fit(3, [0.5, 0.6], right, 0.0, []),  # merged shared programs: not the check's concern
        fit(4, [0.0, 0.0], {"study_0": [0.0], "study_1": [0.0]}, 0.0, []),  # lost everything
    ]
    older_other_size = [
        {"record": "meta", "benchmark": "multistudy", "command": "multistudy.py --y"},
        fit(0, [1.0, 1.0], right, 0.0, [], n_genes=400),
    ]
    superseded = [{"record": "meta", "benchmark": "multistudy", "command": "multistudy.py --z"},
                  fit(0, [0.0, 0.0], right, 0.0, [])]  # fmt: skip
    assert check_cell(run[1]) == "ok"
    assert check_cell(run[2]) == "flagged: shared_1"
    assert check_cell(run[3]) == "flagged: repeated study_0:specific_1, study_1:specific_1"
    assert check_cell({"f1_shared": [1.0]}) == "-"
    text = "\n".join(multistudy_section([superseded, older_other_size, run]))
    assert "multistudy.py --x" in text and "multistudy.py --y" in text
    assert "multistudy.py --z" not in text  # an older run of the same size is replaced
    assert "2 of 3 misassigned fits" in text and "0 of 1 right fits flagged" in text
    assert "Not counted: 1 fit(s) that lost every program" in text


def test_multistudy_script_json_lines():
    """benchmarks/multistudy.py, cut short (--quick with 3 epochs): a meta line, one fit line with
    the mask F1s and the check's verdict, and one cost line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / "multistudy.py"), "--quick", "--max-epochs", "3"]
    cmd += ["--train-kwargs", '{"kl_free_bits_specific": 0.25}']  # recorded (passed: below)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r.get("record", r.get("benchmark")) for r in records] == [
        "meta",
        "multistudy",
        "multistudy_cost",
    ]
    meta, fit, cost = records
    assert meta["settings"]["max_epochs"] == 3 and meta["settings"]["studies"] == [3]
    assert meta["settings"]["train_kwargs"] == {"kl_free_bits_specific": 0.25}
    assert fit["train_kwargs"] == {"kl_free_bits_specific": 0.25}
    assert fit["n_studies"] == 3 and fit["max_epochs"] == 3
    assert len(fit["f1_shared"]) == 2 and set(fit["f1_specific"]) == {
        "study_0",
        "study_1",
        "study_2",
    }
    for f in [*fit["f1_shared"], *(f for fs in fit["f1_specific"].values() for f in fs)]:
        assert 0.0 <= f <= 1.0
    assert isinstance(fit["check_ok"], bool) and isinstance(fit["check_problems"], list)
    assert 0.0 <= fit["celltype_accuracy_all"] <= 1.0
    assert cost["benchmark"] == "multistudy_cost" and cost["n_studies"] == 3


def test_zeisel_pca_components_methods_and_report_lines():
    """zeisel.py accepts pca_k<K> (PCA with K components) besides its methods; make_report lists
    PCA's accuracy by K and sets each Sparse VAE variant beside PCA with as many components as
    it has active factors, and keeps pca_k<K> out of the baselines the targets compare with."""
    import argparse

    import pytest

    sys.path.insert(0, str(BENCH))
    from make_report import factors_used_lines, mean_sd, z_label, z_rank
    from zeisel import method_name

    assert method_name("pca_k9") == "pca_k9" and method_name("sparsevae_nb") == "sparsevae_nb"
    from zeisel import parse_args

    assert parse_args(["--save-dir", "/tmp/x"]).save_dir == "/tmp/x"
    assert parse_args([]).save_dir is None
    for bad in ("pca_k0", "pca_kx", "pca9", "tsne"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown method"):
            method_name(bad)
    assert z_label("pca_k9") == "PCA, 9 components" and z_label("pca") == "PCA"
    # Tables list the methods in the order of Z_LABELS (the Sparse VAE first), others after.
    merged_order = ["vae_nb", "fa", "other", "sparsevae_nb", "scvi"]
    assert sorted(merged_order, key=z_rank) == ["sparsevae_nb", "vae_nb", "scvi", "fa", "other"]

    sv = [{"accuracy": 0.95, "active_factors": 9}, {"accuracy": 0.96, "active_factors": 10}]
    groups = {
        "sparsevae_nb": sv,
        "pca": [{"accuracy": 0.962}],
        "pca_k9": [{"accuracy": 0.943}],
        "pca_k3": [{"accuracy": 0.883}],
    }

    def acc(m):
        return mean_sd([r["accuracy"] for r in groups[m]])[0]

    lines = factors_used_lines(groups, ["sparsevae_nb"], acc)
    text = "\n".join(lines)
    assert "3: 0.883, 9: 0.943, 15: 0.962" in text
    assert "9.5 active factors, accuracy 0.955; PCA with 9 components: 0.943" in text
    assert factors_used_lines({"sparsevae_nb": groups["sparsevae_nb"]}, ["sparsevae_nb"], acc) == []


def test_merge_runs_joins_a_rerun_split_by_rho():
    """An identifiability re-run split by rho over two processes is joined into one run (rhos
    the union, fits of both parts) before merging; parts that differ otherwise, or overlap in
    rho, are refused."""
    sys.path.insert(0, str(BENCH))
    from merge_runs import join_parts

    def part(rhos, epochs=5, started="t"):
        settings = {"rhos": rhos, "seeds": 1, "epochs": epochs, "methods": ["m"]}
        meta = {"record": "meta", "benchmark": "identifiability", "started": started,
                "note": "n", "settings": settings}  # fmt: skip
        fits = [{"record": "fit", "method": "m", "rho": r, "seed": 0} for r in rhos]
        return [meta, *fits, {"record": "summary", "method": "m"}]

    joined = join_parts([part([0.0, 0.2], started="a"), part([0.8, 0.6], started="b")])
    assert joined[0]["settings"]["rhos"] == [0.0, 0.2, 0.6, 0.8]
    assert "run in 2 parts" in joined[0]["note"] and "started b" in joined[0]["note"]
    assert sorted(r["rho"] for r in joined[1:]) == [0.0, 0.2, 0.6, 0.8]
    assert all(r["record"] == "fit" for r in joined[1:])
    for bad in ([part([0.0]), part([0.6], epochs=300)], [part([0.0, 0.2]), part([0.2])]):
        try:
            join_parts(bad)
        except SystemExit:
            pass
        else:
            raise AssertionError("parts that cannot be joined were joined")


def test_report_hides_identifiability_runs_carried_forward_by_a_later_merge():
    """A run whose every fit (method, rho, seed) a later run with the same settings also has is
    not shown again; a run with other settings, or with fits the later one lacks, is."""
    sys.path.insert(0, str(BENCH))
    from make_report import superseded

    def run(methods, epochs=300):
        meta = {"record": "meta", "settings": {"epochs": epochs, "methods": methods}}
        return [meta, *({"record": "fit", "method": m, "rho": 0.0, "seed": 0} for m in methods)]

    old, merged = run(["a", "b"]), run(["a", "b", "c"])
    assert superseded(old, [merged])
    assert not superseded(merged, [old])
    assert not superseded(old, [run(["a", "b", "c"], epochs=40)])
    assert not superseded(run(["a", "d"]), [merged])
    assert not superseded(merged, [])


def test_merge_runs_more_seeds():
    """--more-seeds adds the fits of further seeds of the same methods and settings, recomputes
    the summaries, keeps the first run's stability lines (the report shows them), and refuses
    other settings, other methods or repeated seeds."""
    sys.path.insert(0, str(BENCH))
    from merge_runs import more_seeds

    def run(seeds, epochs=50, methods=("pca", "fa")):
        settings = {"seeds": len(seeds), "epochs": epochs, "methods": list(methods)}
        meta = {"record": "meta", "benchmark": "zeisel", "settings": settings, "started": "s"}
        fits = [
            {"record": "fit", "method": m, "seed": sd, "accuracy": 0.9 + 0.01 * sd}
            for sd in seeds
            for m in methods
        ]
        return [meta, *fits]

    merged = more_seeds("zeisel", run([0, 1]), [run([2, 3]), run([4])])
    assert merged[0]["settings"]["seeds"] == 5
    assert "more seeds" in merged[0]["note"]
    fits = [r for r in merged if r["record"] == "fit"]
    assert sorted({r["seed"] for r in fits}) == [0, 1, 2, 3, 4] and len(fits) == 10
    summary = {r["method"]: r for r in merged if r["record"] == "summary"}
    assert summary["pca"]["n_seeds"] == 5
    assert abs(summary["pca"]["accuracy_mean"] - 0.92) < 1e-9
    # the first run's final stability lines are kept with the seeds they cover; partial ones not
    stab = {"record": "stability", "method": "sparsevae_nb", "n_fits": 2, "median_abs_r": 0.97}
    first = [*run([0, 1]), {**stab, "partial": True, "median_abs_r": 0.5}, stab]
    kept = [r for r in more_seeds("zeisel", first, [run([2])]) if r["record"] == "stability"]
    assert kept == [{**stab, "seeds": [0, 1]}]
    from make_report import zeisel_stability_lines

    table = zeisel_stability_lines(kept)
    assert "| Sparse VAE (NB, counts) | 0, 1 | 0.970 | - | - / - |" in table
    assert zeisel_stability_lines(run([0])) == []
    from make_report import mask_target_lines

    fits = [
        {"active_factors": a, "identifiable_factors": i, "median_selected_share": sh}
        for a, i, sh in ((10, 10, 0.15), (9, 7, 0.25))
    ]
    lines = mask_target_lines(fits, kept)
    assert lines[0].endswith("**not met** (9-10)")
    assert "(10 of 10, 7 of 9)" in lines[1] and "**not met**" in lines[1]
    assert lines[2].endswith("(15.0%-25.0%)") and "**not met**" in lines[2]
    assert "**met** (0.970)" in lines[3] and lines[3].endswith("**not met** (-)")
    assert mask_target_lines(fits[:1], [])[0].endswith("**met** (10-10)")
    for bad in (run([2], epochs=100), run([2], methods=("pca",)), run([1])):
        try:
            more_seeds("zeisel", run([0, 1]), [bad])
        except SystemExit:
            pass
        else:
            raise AssertionError("runs that cannot be joined were joined")


def test_stability_script_json_lines(tmp_path):
    """benchmarks/stability.py --quick: a meta line, a fit line per method and seed, and a
    stability line per model (the linear peers give their accuracy only); --train-kwargs is
    recorded with the Sparse VAE's fits; --save-dir keeps the fits and --fits-from gives their
    stability line again without fitting."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / "stability.py"), "--quick", "--methods", "sparsevae"]
    cmd += ["vae", "pca", "--train-kwargs", '{"rotate_after_warmup": false}']
    cmd += ["--save-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    kinds = [(r["record"], r.get("method")) for r in records]
    assert kinds == [
        ("meta", None),
        ("fit", "sparsevae"),
        ("fit", "sparsevae"),
        ("stability", "sparsevae"),
        ("fit", "vae"),
        ("fit", "vae"),
        ("stability", "vae"),
        ("fit", "pca"),
        ("fit", "pca"),
    ]
    fit = records[1]
    assert fit["train_kwargs"] == {"rotate_after_warmup": False}
    assert records[4]["train_kwargs"] == {}  # the VAE's
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records[7:])
    assert 0 <= fit["identifiable_factors"] <= fit["active_factors"] <= 15
    assert len(fit["anchors_per_factor"]) == 15 and 0.0 <= fit["accuracy"] <= 1.0
    assert isinstance(fit["unfaithful_factors"], list)
    assert fit["effect_share_selected"] is None or 0.0 <= fit["effect_share_selected"] <= 1.0
    stab = records[3]
    assert 0.0 <= stab["median_abs_r"] <= 1.0 and stab["seeds"] == [0, 1]
    assert stab["median_jaccard_selected"] is None or 0.0 <= stab["median_jaccard_selected"] <= 1
    assert records[6]["median_jaccard_anchors"] is None  # the VAE has no mask
    assert stab["split_half_consensus_anchors"] is None  # fewer than four fits
    saved = sorted(p.name for p in tmp_path.glob("*.h5ad"))
    assert saved == [f"pbmc_{m}_s{s}.h5ad" for m in ("sparsevae", "vae") for s in (0, 1)]
    again = [sys.executable, str(BENCH / "stability.py"), "--fits-from", str(tmp_path)]
    again += ["--data", "pbmc", "--methods", "sparsevae"]
    proc = subprocess.run(again, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    assert {k: v for k, v in line.items() if k != "fits_from"} == stab


def test_split_half_consensus_anchors_compares_two_halves_of_the_fits():
    """Four fits in two identical halves give consensus anchors that agree (Jaccard 1); halves
    of copies of two fits give those fits' anchor Jaccard; fewer than four fits give None."""
    sys.path.insert(0, str(BENCH))
    import scvi
    from stability import split_half_consensus_anchors

    import sparsevae

    from .conftest import QUIET, small_counts

    adata = small_counts(n_cells=300, n_genes=60, n_factors=3)
    sparsevae.SparseVAE.setup_anndata(adata)
    fits = []
    for seed in (0, 1):  # fits with anchors (16-24 per active factor)
        scvi.settings.seed = seed
        model = sparsevae.SparseVAE(adata, n_factors=3, n_hidden=16)
        model.train(max_epochs=80, **QUIET)
        fits.append(model.write_results(adata.copy(), effects=False))
    assert split_half_consensus_anchors(fits * 1, sparsevae) is None
    assert split_half_consensus_anchors(fits * 2, sparsevae) == 1.0
    # halves (fit 0, fit 0) and (fit 1, fit 1): their consensus anchors are each fit's anchors
    pair = sparsevae.tl.factor_stability(fits).factors
    expected = pair.loc[pair["active"], "median_jaccard_anchors"].median()
    assert not np.isnan(expected)
    got = split_half_consensus_anchors([fits[0], fits[0], fits[1], fits[1]], sparsevae)
    assert got == pytest.approx(expected, abs=1e-4)


@needs_hallmark
def test_multistudy_real_background_json_lines():
    """benchmarks/multistudy.py --real pbmc --quick, cut short (3 epochs), folds 4 and 1: a meta
    line, one fit line per (seed, fold) with the shares of each planted program's genes per
    label, and one summary line per fold; fold 1 (nothing planted) runs first and is the
    background the fold-4 fit's genes are scored against."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        str(BENCH / "multistudy.py"),
        "--real",
        "pbmc",
        "--quick",
        "--max-epochs",
        "3",
        "--folds",
        "4",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["record"] for r in records] == ["meta", "fit", "fit", "summary", "summary"]
    assert all(r["benchmark"] == "multistudy_real" for r in records)
    meta, background, fit, _, summary = records
    assert meta["settings"]["folds"] == [1.0, 4.0] and meta["settings"]["seeds"] == [0]
    assert background["fold"] == 1.0 and "planted_own_in_background" not in background
    for p, q in zip(fit["programs"], background["programs"], strict=True):
        assert list(p["labels"]) == list(q["labels"]) and len(p["labels"]) == p["n_genes"]
        own = sum(q["labels"][g] != "none" for g in q["labels"])
        assert p["own_in_background"] == round(own / p["n_genes"], 4)
    assert 0.0 <= fit["planted_own_in_background"] <= 1.0
    assert summary["planted_own_in_background_mean"] == fit["planted_own_in_background"]
    assert fit["data"] == "pbmc" and fit["split"] == "random" and fit["n_studies"] == 2
    assert fit["fold"] == 4.0 and fit["n_epochs"] == 3
    # One planted program per study, disjoint gene sets, in half of that study's cells.
    assert [p["study"] for p in fit["programs"]] == ["study_0", "study_1"]
    for p in fit["programs"]:
        assert p["n_genes"] >= 15 and p["n_cells"] > 100 and p["realised_fold"] > 2
        shares = ["specific_right_study", "shared", "both", "none", "specific_other"]
        for key in shares:
            assert 0.0 <= p[key] <= 1.0
        assert abs(sum(p[k] for k in shares) - 1.0) < 1e-3
    for key in (
        "planted_specific_right_study",
        "planted_shared",
        "planted_both",
        "data_genes_shared",
        "data_genes_both",
        "data_genes_specific",
        "celltype_accuracy_shared",
    ):
        assert 0.0 <= fit[key] <= 1.0, key
        assert 0.0 <= summary[f"{key}_mean"] <= 1.0, key
    assert fit["data_genes_selected"] >= 0
    assert isinstance(fit["check_ok"], bool) and isinstance(fit["check_problems"], list)
    kinds = ["shared", "study_0", "study_1"]
    assert list(fit["unfaithful_factors"]) == kinds and list(fit["effect_share_selected"]) == kinds
    for p in fit["programs"]:
        assert p["captured_by"] in fit_factor_names(fit) and 0.0 <= p["captured_abs_r"] <= 1.0
        assert p["captured_kind"] == ("specific" if "specific" in p["captured_by"] else "shared")
        assert 0.0 <= p["pca_abs_r"] <= 1.0
    assert summary["fold"] == 4.0 and summary["seeds"] == [0]
    assert set(summary["specific_right_study_by_program"]) == {
        f"{p['name']} in {p['study']}" for p in fit["programs"]
    }
    by_program = set(summary["specific_right_study_by_program"])
    assert set(summary["captured_abs_r_by_program"]) == by_program


def load_multistudy_bench():
    """benchmarks/multistudy.py as a module (it imports its sibling helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_multistudy", BENCH / "multistudy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCH))
    return bench


def fit_factor_names(fit):
    shared = [f"shared_{k}" for k in range(fit["n_factors"])]
    return shared + [f"specific_{k}" for k in range(fit["n_specific_factors"])]


@needs_hallmark
def test_multistudy_fits_pass_train_kwargs_to_train(monkeypatch):
    """--train-kwargs reaches model.train() in both modes (the fit stops there)."""
    import sparsevae

    bench = load_multistudy_bench()
    seen = []

    class Stop(Exception):
        pass

    def train(self, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(sparsevae.SparseVAE, "train", train)
    size = {"n_genes": 60, "n_shared": 1, "n_specific": 1, "genes_per_program": 10,
            "n_cells_per_study": 30, "n_hidden": 8, "batch_size": 32}  # fmt: skip
    with pytest.raises(Stop):
        bench.fit(2, 0, size, 2, train_kwargs={"kl_free_bits_specific": 0.0})
    background, programs = bench.real.background("pbmc", 2, 0)
    with pytest.raises(Stop):
        bench.fit_real("pbmc", background, programs, "random", 0, 4.0, 2, 0.5, 1,
                       train_kwargs={"kl_free_bits_specific": 0.0})  # fmt: skip
    assert [k["kl_free_bits_specific"] for k in seen] == [0.0, 0.0]


def test_multistudy_captured_names_the_factor_that_follows_the_planted_activity():
    """captured(): the factor with the largest |r| with the planted activity, within the study."""
    from types import SimpleNamespace

    bench = load_multistudy_bench()
    rng = np.random.default_rng(0)
    study = np.array(["study_0"] * 50 + ["study_1"] * 50)
    activity = np.where(study == "study_1", rng.uniform(0, 1, 100) * (rng.random(100) < 0.5), 0.0)
    z = rng.normal(size=(100, 3))
    z[:, 0] = np.where(study == "study_0", 5 * rng.normal(size=100), 0.0)  # varies elsewhere
    z[:, 2] = -activity + 0.01 * rng.normal(size=100)  # follows it, sign aside
    z[:, 1] = 1.0  # constant: no correlation
    model = SimpleNamespace(
        adata=SimpleNamespace(obs=pd.DataFrame({"study": study, "planted_activity": activity})),
        factor_names=["shared_0", "shared_1", "specific_0"],
        shared_factor_names=["shared_0", "shared_1"],
    )
    out = bench.captured(model, z, {"study": "study_1"})
    assert out["captured_by"] == "specific_0" and out["captured_kind"] == "specific"
    assert out["captured_abs_r"] > 0.99
    # The peer's view: a program that dominates its study's variance is a principal component;
    # with nothing planted, no component follows the (random) activity.
    import anndata as ad
    import scipy.sparse as sp

    counts = rng.poisson(5.0, size=(100, 30)).astype(np.float32)
    counts[:, :10] *= (1 + 8 * activity)[:, None].astype(np.float32)
    obs = pd.DataFrame(
        {"study": study, "planted_activity": activity}, index=[str(i) for i in range(100)]
    )
    strong = ad.AnnData(sp.csr_matrix(counts), obs=obs, layers={"counts": sp.csr_matrix(counts)})
    assert bench.pca_abs_r(strong, {"study": "study_1"}) > 0.9
    flat = rng.poisson(5.0, size=(100, 30)).astype(np.float32)
    none = ad.AnnData(sp.csr_matrix(flat), obs=obs, layers={"counts": sp.csr_matrix(flat)})
    assert bench.pca_abs_r(none, {"study": "study_1"}) < 0.6


def test_multistudy_against_background_scores_new_and_own_genes_apart():
    """A planted gene the unplanted fit already selects is scored as an own gene; the others
    are asked to be specific to the right study."""
    bench = load_multistudy_bench()
    background = {
        "programs": [
            {"name": "P", "labels": {"a": "none", "b": "none", "c": "shared", "d": "none"}}
        ]
    }
    labels = {"a": "specific to study_0", "b": "both", "c": "both", "d": "specific to study_1"}
    inside = ["a", "c"]  # genes in study_0's specific mask ("both" for b: another study's)
    record = {
        "programs": [
            {
                "name": "P",
                "study": "study_0",
                "labels": labels,
                "in_right_specific_mask_genes": inside,
            }
        ]
    }
    bench.against_background(record, background)
    p = record["programs"][0]
    assert p["own_in_background"] == 0.25
    assert p["specific_right_study_new"] == round(1 / 3, 4)  # a of a, b, d
    assert p["in_right_specific_mask_own"] == 1.0  # c: "both"
    assert p["placed_right"] == 0.5  # a (new, specific to study_0) and c (own, in the mask)
    assert record["planted_specific_right_study_new"] == round(1 / 3, 4)


def _quick(script: str, *args: str, timeout: int = 300) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_named_genes_quick_json_lines():
    import pytest

    if not (ROOT.parent / "shared" / "genesets" / "c8.all.v7.5.1.symbols.gmt").is_file():
        pytest.skip("../shared/genesets not found")
    records = _quick("named_genes.py", "--quick")
    kinds = [r["record"] for r in records]
    assert kinds[0] == "meta" and kinds[-2:] == ["fit", "summary"]
    fit = records[-2]
    factors = [r for r in records if r["record"] == "factor"]
    assert len(factors) == fit["active_factors"]
    assert fit["n_named"] == sum(r["named"] for r in factors)
    assert 0.0 <= fit["named_share"] <= 1.0 and 0.0 <= fit["accuracy"] <= 1.0
    for r in factors:
        assert set(r["anchor_markers"]) <= set(r["anchors"]) | set(r["selected_markers"])
        assert {"top_C8", "fdr_C8", "top_Hallmark", "top_GO_BP", "celltype"} <= set(r)


def test_out_of_core_quick_trains_from_the_file(tmp_path):
    records = _quick(
        "out_of_core.py", "--quick", "--in-memory", "--write-results", "--threads", "1",
        "--dir", str(tmp_path),
    )  # fmt: skip
    runs = [r for r in records if r["record"] == "run"]
    assert [r["backed"] for r in runs] == [True, False]
    for r in runs:
        assert "error" not in r, r.get("error")
        assert r["cells"] == 5000 and r["genes"] == 200 and r["cells_trained"] == 640
        assert r["write_results_finite"] and r["rss_after_train_mb"] > 0


def test_gpu_script_records_the_device_and_refuses_without_one():
    import argparse

    import pytest

    sys.path.insert(0, str(BENCH))
    import gpu

    rec = gpu.device_record()
    assert rec["record"] == "device" and isinstance(rec["cuda_available"], bool)
    if rec["cuda_available"]:
        pytest.skip("a GPU is present: the refusal is not reachable")
    assert gpu.main(["--quick"]) == 2
    commands = gpu.steps(argparse.Namespace(quick=True, dir="/tmp"), "cpu")
    assert [Path(c[1]).name for c in commands] == ["speed.py", "speed.py", "out_of_core.py"]
    assert "--scaling" in commands[1] and "--accelerator" in commands[2]


def test_gene_effects_quick_agrees_and_times_both():
    (rec,) = _quick("gene_effects.py", "--quick")
    assert rec["genes"] == 200 and rec["factors"] == 15
    assert rec["max_relative_difference"] < 1e-4
    assert rec["per_factor_jvp_seconds"] > 0 and rec["one_backward_pass_seconds"] > 0


def test_zeisel_mask_summary_and_stability_use_the_package_rules():
    sys.path.insert(0, str(BENCH))
    import scvi
    from zeisel import FITS, mask_summary, stability_records

    import sparsevae

    from .conftest import QUIET, small_counts

    FITS.clear()
    fits = []
    for seed in (0, 1):
        adata = small_counts()
        sparsevae.SparseVAE.setup_anndata(adata)
        scvi.settings.seed = seed
        model = sparsevae.SparseVAE(adata, n_factors=2, n_hidden=8)
        model.train(max_epochs=3, **QUIET)
        summary = mask_summary(model)
        report = sparsevae.tl.identifiability_report(model).factors
        assert summary["identifiable_factors"] == int(report["identifiable"].sum())
        assert summary["anchors_per_factor"] == report["n_anchors"].tolist()
        fits.append(model.write_results(adata, effects=False))
    (rec,) = stability_records({"sparsevae_nb": fits, "single": fits[:1]})
    expected = sparsevae.tl.factor_stability(fits)
    assert rec["method"] == "sparsevae_nb" and rec["n_fits"] == 2
    assert rec["median_abs_r"] == expected.median_abs_r


def test_mask_flicker_reads_selection_within_a_fit_and_across_starts():
    """benchmarks/mask_flicker.py: a fit's earlier epochs are compared with its last one; two
    starts whose factors are the same up to order match exactly however the selection is read,
    and the quick run prints a meta, a fit line per seed and an across line."""
    sys.path.insert(0, str(BENCH))
    from mask_flicker import across, within

    import sparsevae

    rng = np.random.default_rng(0)
    last = np.zeros((6, 2))
    last[[0, 1, 2], 0] = 0.9  # factor 0: genes 0-2, anchors 0-1 (gene 2 shared)
    last[[2, 3, 4], 1] = 0.9  # factor 1: genes 2-4, anchors 3-4
    earlier = last.copy()
    earlier[1, 0] = 0.1  # one epoch before: gene 1 not selected yet
    z = rng.normal(size=(50, 2))
    run = {"seed": 0, "epochs": [8, 9], "pstar": np.stack([earlier, last]), "z": z}
    rec = within(run, sparsevae)
    assert rec["active_factors"] == 2 and rec["selected_entries"] == 6
    assert rec["per_epoch"]["9"] == {"jaccard_selected": 1.0, "jaccard_anchors": 1.0, "anchors": 4}
    # factor 0: selected {0, 2} vs {0, 1, 2} -> 2/3, anchors {0} vs {0, 1} -> 1/2; factor 1: 1, 1
    assert rec["per_epoch"]["8"]["jaccard_selected"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    assert rec["per_epoch"]["8"]["jaccard_anchors"] == pytest.approx(0.75, abs=1e-4)
    other = {"seed": 1, "epochs": [8, 9], "pstar": run["pstar"][:, :, ::-1], "z": z[:, ::-1]}
    rec = across(run, other, sparsevae)
    for reading in ("last_epoch", "vote_last5", "mean_pstar"):
        assert rec[reading]["jaccard_selected"] == 1.0 and rec[reading]["jaccard_anchors"] == 1.0
    records = _quick(
        "mask_flicker.py",
        "--quick",
        "--train-kwargs",
        '{"n_epochs_mask_average": 0, "n_epochs_mask_settle": 0}',
    )
    assert [r["record"] for r in records] == ["meta", "fit", "fit", "across"]


def test_entry_evidence_is_the_nll_lost_by_closing_the_entry():
    """benchmarks/entry_evidence.py: an entry's evidence equals the gene's NLL (at the
    posterior-mean factors) with its gate closed minus with it open, other genes' entries
    evaluated in the same pass do not leak into it, the gates are restored, and the score is
    evidence minus the weighted prior cost."""
    sys.path.insert(0, str(BENCH))
    import scvi
    import torch
    from _common import posterior_means
    from entry_evidence import closing_evidence, with_results

    import sparsevae

    from .conftest import QUIET, small_counts

    adata = small_counts(n_cells=150, n_genes=30, n_factors=2)
    sparsevae.SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = sparsevae.SparseVAE(adata, n_factors=2, n_hidden=16)
    model.train(max_epochs=30, **QUIET)
    gate = model.module.decoder.gate
    before = gate.clone()
    table = closing_evidence(model, batch_size=64)
    torch.testing.assert_close(gate, before)
    selected = (model.module.prior.p_star >= 0.5).numpy()
    assert len(table) == selected.sum() > 0
    _, _, base = posterior_means(model, adata)
    for row in table.sample(3, random_state=0).itertuples():
        gate[row.gene, row.factor] = 0.0
        _, _, closed = posterior_means(model, adata)
        gate.copy_(before)
        # posterior_means sums the NLL over genes; only gene row.gene changed
        assert row.evidence == pytest.approx(float((closed - base).sum()), rel=1e-3, abs=1e-2)
    np.testing.assert_allclose(table["score"], table["evidence"] - table["cost"])
    dropped = with_results(model, table)
    pstar = dropped.varm["sparsevae_pstar"]
    negative = table[table["score"] < 0]
    assert (pstar[negative["gene"], negative["factor"]] == 0).all()


def test_entry_evidence_quick_prints_only_json_lines():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / "entry_evidence.py"), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["record"] for r in records] == ["meta", "fit", "fit", "pair"]
    for fit in records[1:3]:
        assert fit["n_selected"] == sum(f["n_selected"] for f in fit["factors"])
        assert fit["n_negative_borderline"] <= fit["n_negative"] <= fit["n_selected"]
    pair = records[-1]
    assert pair["seeds"] == [0, 1] and set(pair) >= {"default", "likelihood_rule"}


def test_factor_kl_counts_the_factors_a_vae_uses():
    """_common.factor_kl: the per-factor mean KL of q(z|x) to N(0, 1) equals the closed form
    on the posterior, and a factor forced to the prior (its encoder rows zeroed) has KL 0."""
    sys.path.insert(0, str(BENCH))
    import scvi
    import torch
    from _common import MIN_FACTOR_KL, factor_kl

    import sparsevae

    from .conftest import QUIET, small_counts

    adata = small_counts(n_cells=100, n_genes=40, n_factors=2)
    sparsevae.SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = sparsevae.SparseVAE(adata, n_factors=3, n_hidden=8, mask=None)
    model.train(max_epochs=5, **QUIET)
    enc = model.module.encoder
    with torch.no_grad():  # factor 2: mean 0 and variance 1 for every cell
        enc.mean_encoder.weight[2].zero_()
        enc.mean_encoder.bias[2] = 0.0
        enc.var_encoder.weight[2].zero_()
        enc.var_encoder.bias[2] = 0.0
    kl = factor_kl(model, adata, batch_size=32)
    m = model.get_latent_representation()
    v = model.get_latent_representation(give_mean=True, return_dist=True)[1]
    expected = (0.5 * (m**2 + v - 1.0 - np.log(v))).mean(0)
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-6)
    assert kl[2] == pytest.approx(0.0, abs=1e-6) and (kl[:2] > MIN_FACTOR_KL).all()
