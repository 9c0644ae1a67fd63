"""Selection study: candidate recipes against the default, paired by patient, over repeated runs.

    CV="idcscope cv ../shared/data/idc-sample ../shared/data/idc-scatter --folds 3 \
        --split models/idc-default.split.json --fold-seed 0"
    $CV --seed 0 --out runs/cv/default-s0;  $CV --seed 1 --out runs/cv/default-s1
    $CV --seed 0 --config nbhd2.yaml --out runs/cv/nbhd2-s0
    python benchmarks/select_study.py --baseline runs/cv/default-s0 runs/cv/default-s1 \
        --candidate nbhd2 runs/cv/nbhd2-s0 --ensemble

Every run must test the same patients with the same ones locked away (the split file's
test list: the lockbox no choice sees). Each candidate is compared with the baseline by
``idcscope.training.selection.compare``: the difference of the means over runs, with a
95% interval from a paired patient bootstrap and from the spread between runs of one
recipe (pooled over every recipe given with several runs). ``--ensemble`` adds the
baseline's runs averaged into one (``selection.load_ensemble``): what distilling them can
reach. Prints one markdown table per candidate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idcscope.training import selection

# The cohorts a user meets: a whole patient, scattered uploads, each patch of a whole
# patient alone, and a few patches of a patient (see training.contexts.score_thinned).
COHORTS = {
    "context/idc-sample": "whole patients",
    "context/idc-scatter": "scattered patches",
    "lone/idc-sample": "whole patients, each patch alone",
    "lone/idc-scatter": "scattered, each patch alone",
    "thinned/idc-sample": "5-60% of a whole patient",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", nargs="+", type=Path, required=True, help="cv folders")
    ap.add_argument("--candidate", nargs="+", action="append", default=[],
                    metavar=("NAME", "RUN"), help="a name, then its cv folders")  # fmt: skip
    ap.add_argument("--ensemble", action="store_true", help="also the baseline's runs averaged")
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument("--all-cohorts", action="store_true", help="not only the five above")
    ap.add_argument("--per-patient", metavar="COHORT", default="context/idc-sample",
                    help="AUC within each patient of this cohort, per recipe")  # fmt: skip
    args = ap.parse_args()
    paths = {"baseline": args.baseline, **{name: runs for name, *runs in args.candidate}}
    loaded = {name: [selection.load_run(run) for run in runs] for name, runs in paths.items()}
    print(each_run(paths, loaded))
    baseline, candidates = loaded.pop("baseline"), loaded
    if args.ensemble:
        if len(args.baseline) < 2:
            raise SystemExit("--ensemble needs at least two baseline runs")
        candidates["ensemble of the baseline runs"] = [selection.load_ensemble(args.baseline)]
    for name, runs in candidates.items():
        noise = [r for other, r in candidates.items() if other != name and len(r) > 1]
        table = selection.compare(baseline, runs, noise, n_boot=args.n_boot)
        if not args.all_cohorts:
            table = table[table["cohort"].isin(COHORTS)]
            table = table.assign(cohort=table["cohort"].map(COHORTS))
        print(
            f"## {name} against the baseline\n\n{selection.markdown(table, ('baseline', name))}\n"
        )
        within = selection.per_patient(baseline, runs, args.per_patient)
        print(f"AUC within each patient of {args.per_patient}:\n")
        print(
            f"| patient | patches | IDC share | baseline | {name} | difference |\n"
            + "|---" * 6
            + "|"
        )
        for patient, r in within.iterrows():
            print(f"| {patient} | {r.patches:.0f} | {r.idc_share:.2f} | {r.baseline:.3f} "
                  f"| {r.candidate:.3f} | {r.delta:+.3f} |")  # fmt: skip
        print()


def each_run(paths: dict[str, list], loaded: dict[str, list]) -> str:
    """Every run's AUC / balanced accuracy / ECE per cohort, the draws the comparisons
    pool: a seed's luck shows as a row that is low under every recipe."""
    lines = ["## each run\n", "| recipe | run | " + " | ".join(COHORTS.values()) + " |",
             "|---" * (len(COHORTS) + 2) + "|"]  # fmt: skip
    for name, runs in loaded.items():
        for path, run in zip(paths[name], runs, strict=True):
            cells = []
            for cohort in COHORTS:
                v = selection.cohort_values(run[run["cohort"] == cohort])
                cells.append(f"{v['auc']:.3f} / {v['balanced_accuracy']:.3f} / {v['ece']:.3f}")
            lines.append(f"| {name} | {Path(path).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
