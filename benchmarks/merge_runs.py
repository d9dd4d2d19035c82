"""Merge a re-run of some methods into the last run of a benchmark, as one run (JSON lines).

Usage::

    python benchmarks/merge_runs.py identifiability OLD.jsonl NEW.jsonl [--rename A=B] > out.jsonl

When a code change touches only some methods (say SparseVAE), re-running just those and keeping
the other methods' fits from the previous run saves hours. The merged run has NEW's meta record
(its note extended to say which methods come from which run), NEW's fits, OLD's fits of the
methods NEW did not run, and summaries recomputed from the merged fits by the benchmark's own
``summarise``. Only ``identifiability`` and ``zeisel`` (per-method fits over seeds) are
supported. Both runs must use the same settings apart from the methods; this is checked.

An identifiability re-run may be split by rho over several processes (``--rhos 0 0.2 0.4`` in
one, ``--rhos 0.6 0.8`` in another, to use both cores): give every part as NEW
(``... OLD.jsonl PART1.jsonl PART2.jsonl``); the parts are joined into one run first, and must
agree in every setting but ``rhos``.

More seeds for a run (``--more-seeds``): NEW holds runs of the same methods and settings with
other seeds (``zeisel.py --first-seed 2 --seeds 2``, ...); their fits are added to OLD's and the
summaries recomputed. Seeds must not repeat. OLD's ``stability`` lines are kept as they are, with
the seeds they cover (stability needs the fitted models, which the JSON lines do not hold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_report import meta_of, read_last_run

# Settings that may differ between the two runs (everything else must match).
FREE_SETTINGS = {"methods", "out", "note", "threads", "save_dir"}


def merge(
    benchmark: str,
    old: list[dict[str, Any]],
    new: list[dict[str, Any]],
    rename: dict[str, str] | None = None,
    note: str | None = None,
) -> list[dict]:
    """The merged run's records: meta, fits, summaries.

    ``rename`` relabels NEW's methods (for a re-run made while a method's settings were the
    package default under another name); the merged meta note says so.
    """
    rename = rename or {}
    summarise = _summarise(benchmark)
    old_meta, new_meta = meta_of(old), meta_of(new)
    for meta, name in ((old_meta, "OLD"), (new_meta, "NEW")):
        if meta.get("benchmark") != benchmark:
            raise SystemExit(f"{name} is not a {benchmark} run (meta: {meta.get('benchmark')!r})")
    o_set, n_set = old_meta.get("settings", {}), new_meta.get("settings", {})
    differ = sorted(k for k in set(o_set) | set(n_set) - FREE_SETTINGS if k not in FREE_SETTINGS
                    and o_set.get(k) != n_set.get(k))  # fmt: skip
    if differ:
        raise SystemExit(f"the runs differ in settings {differ}: not comparable, not merged")
    new_fits = [
        {**r, "method": rename.get(r["method"], r["method"])}
        for r in new
        if r.get("record") == "fit"
    ]
    rerun = sorted({r["method"] for r in new_fits})
    kept = [r for r in old if r.get("record") == "fit" and r["method"] not in rerun]
    kept_methods = sorted({r["method"] for r in kept})
    meta = dict(new_meta)
    methods = list(dict.fromkeys([*o_set.get("methods", []), *rerun]))
    meta["settings"] = {**n_set, "methods": methods}
    renamed = "".join(f"; NEW's {a!r} fits relabelled {b!r}" for a, b in rename.items())
    meta["note"] = (
        f"{new_meta.get('note') or ''} [merged: {', '.join(rerun)} from the run started "
        f"{new_meta.get('started', '?')}; {', '.join(kept_methods)} from the run started "
        f"{old_meta.get('started', '?')} ({old_meta.get('note') or 'no note'}){renamed}"
        + (f"; {note}" if note else "")
        + "]"
    ).strip()
    fits = new_fits + kept
    # Stability lines (per method, from the fitted models): NEW's for the methods it ran, OLD's
    # for the methods kept.
    stability = [
        {**r, "method": rename.get(r["method"], r["method"])}
        for r in new
        if r.get("record") == "stability" and not r.get("partial")
    ] + [
        r
        for r in old
        if r.get("record") == "stability" and not r.get("partial") and r["method"] not in rerun
    ]
    return [meta, *fits, *summarise(fits), *stability]


def join_parts(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One identifiability run from parts that ran different rhos with the same settings.

    The joined meta record is the first part's, with ``rhos`` the union of the parts' rhos and
    the note extended to say that it ran in parts; its records are the parts' fits.
    """
    if len(parts) == 1:
        return parts[0]
    metas = [meta_of(p) for p in parts]
    if any(m.get("benchmark") != "identifiability" for m in metas):
        raise SystemExit("only identifiability runs can be joined from parts split by rho")
    first = metas[0].get("settings", {})
    for m in metas[1:]:
        st = m.get("settings", {})
        differ = sorted(
            k for k in set(first) | set(st)
            if k not in FREE_SETTINGS | {"rhos"} and first.get(k) != st.get(k)
        )  # fmt: skip
        if differ:
            raise SystemExit(f"the parts differ in settings {differ}: not joined")
    rhos = [sorted(m.get("settings", {}).get("rhos", [])) for m in metas]
    union = sorted({r for rs in rhos for r in rs})
    if sum(len(rs) for rs in rhos) != len(union):
        raise SystemExit(f"the parts' rhos overlap ({rhos}): not joined")
    meta = dict(metas[0])
    meta["settings"] = {**first, "rhos": union}
    started = ", ".join(
        f"rhos {rs} started {m.get('started', '?')}" for rs, m in zip(rhos, metas, strict=True)
    )
    meta["note"] = f"{meta.get('note') or ''} [run in {len(parts)} parts: {started}]".strip()
    fits = [r for p in parts for r in p if r.get("record") == "fit"]
    return [meta, *fits]


def more_seeds(
    benchmark: str,
    old: list[dict[str, Any]],
    parts: list[list[dict[str, Any]]],
    note: str | None = None,
) -> list[dict[str, Any]]:
    """OLD's run with the fits of further seeds from ``parts`` (same methods and settings)."""
    summarise = _summarise(benchmark)
    old_meta = meta_of(old)
    o_set = old_meta.get("settings", {})
    free = FREE_SETTINGS | {"seeds", "first_seed"}
    methods = set(o_set.get("methods", []))
    fits = [r for r in old if r.get("record") == "fit"]
    old_seeds = sorted({r["seed"] for r in fits})
    notes = []
    for part in parts:
        meta = meta_of(part)
        p_set = meta.get("settings", {})
        differ = sorted(
            k for k in set(o_set) | set(p_set) if k not in free and o_set.get(k) != p_set.get(k)
        )
        if differ:
            raise SystemExit(f"the runs differ in settings {differ}: not comparable, not merged")
        if set(p_set.get("methods", [])) != methods:
            raise SystemExit("the runs must have the same methods to add seeds")
        new = [r for r in part if r.get("record") == "fit"]
        repeated = {r["seed"] for r in new} & {r["seed"] for r in fits}
        if repeated:
            raise SystemExit(f"seeds {sorted(repeated)} are in both runs: not merged")
        fits += new
        notes.append(
            f"seeds {sorted({r['seed'] for r in new})} from the run started "
            f"{meta.get('started', '?')}"
        )
    seeds = sorted({r["seed"] for r in fits})
    merged_meta = dict(old_meta)
    merged_meta["settings"] = {**o_set, "seeds": len(seeds)}
    merged_meta["note"] = (
        f"{old_meta.get('note') or ''} [more seeds: seeds {old_seeds} from the run started "
        f"{old_meta.get('started', '?')}; {'; '.join(notes)}" + (f"; {note}" if note else "") + "]"
    ).strip()
    # Stability needs the fitted models, so it cannot be recomputed here: OLD's lines are kept,
    # marked with the seeds they cover.
    stability = [
        {**r, "seeds": r.get("seeds", old_seeds)}
        for r in old
        if r.get("record") == "stability" and not r.get("partial")
    ]
    return [merged_meta, *fits, *summarise(fits), *stability]


def _summarise(benchmark: str) -> Any:
    """The benchmark's own ``summarise``."""
    if benchmark == "identifiability":
        from identifiability import summarise
    elif benchmark == "zeisel":
        from zeisel import summarise
    else:
        raise SystemExit(f"unsupported benchmark {benchmark!r} (identifiability or zeisel)")
    return summarise


def main(argv: list[str] | None = None) -> int:
    """Print the merged run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=["identifiability", "zeisel"])
    p.add_argument("old", type=Path, help="JSON lines holding the previous run (its last run)")
    p.add_argument(
        "new",
        type=Path,
        nargs="+",
        help="JSON lines holding the re-run (its last run); identifiability: one file per "
        "part when the re-run was split by rho",
    )
    p.add_argument(
        "--rename",
        nargs="*",
        default=[],
        metavar="OLD=NEW",
        help="relabel methods of the re-run, e.g. sparsevae=sparsevae_corr",
    )
    p.add_argument("--note", default=None, help="free text added to the merged meta note")
    p.add_argument(
        "--more-seeds",
        action="store_true",
        help="NEW holds further seeds of OLD's methods: add their fits, do not replace methods",
    )
    args = p.parse_args(argv)
    rename = dict(pair.split("=", 1) for pair in args.rename)
    old = read_last_run(args.old)
    if args.more_seeds:
        parts = [read_last_run(path) for path in args.new]
        for rec in more_seeds(args.benchmark, old, parts, args.note):
            print(json.dumps(rec))
        return 0
    new = join_parts([read_last_run(path) for path in args.new])
    for rec in merge(args.benchmark, old, new, rename, args.note):
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
