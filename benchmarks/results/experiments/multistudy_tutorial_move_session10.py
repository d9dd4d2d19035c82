import sys, json, numpy as np, scvi, torch, warnings, logging
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import sparsevae
logging.getLogger("sparsevae").setLevel(logging.ERROR)
for n in ("lightning","lightning.pytorch","scvi"): logging.getLogger(n).setLevel(logging.ERROR)
QUIET=dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False)
move = sys.argv[1] == "1"
for seed in [int(x) for x in sys.argv[2:]]:
    ad = sparsevae.datasets.simulate_multistudy(n_studies=3, n_genes=240, n_shared=2, n_specific=1, genes_per_program=30, n_cells_per_study=300, seed=seed)
    scvi.settings.seed = seed
    sparsevae.SparseVAE.setup_anndata(ad, study_key="study")
    m = sparsevae.SparseVAE(ad, n_factors=3, n_specific_factors=2)
    m.train(max_epochs=100, move_confined=move, **QUIET)
    f1 = {}
    for kind in m.mask_kinds:
        key = "true_mask_shared" if kind == "shared" else f"true_mask_{kind}"
        if key in ad.varm:
            f1[kind] = round(float(sparsevae.tl.mask_f1(m.get_inclusion_probabilities(kind) >= 0.5, ad.varm[key])["f1"].mean()), 3)
    lab = sparsevae.tl.shared_specific_genes(m).genes["label"]
    truth = ad.var["truth"]
    prog = truth != "none"
    acc = float((lab[prog].to_numpy() == truth[prog].to_numpy()).mean())
    ch = sparsevae.tl.check_shared_specific(m)
    print(json.dumps({"seed": seed, "move": move, "moved": m.moved_factors_, "f1": f1, "label_acc": round(acc,3), "ok": ch.ok, "problems": ch.problems}), flush=True)
