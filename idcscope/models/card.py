"""A model card's numbers, written from the model's own out-of-fold measurements.

``make model`` hands ``export --bundle`` a card that says what the model is and how far to
trust it; where the card holds ``<!-- headline -->`` or ``<!-- numbers -->``, the bundle's
card gets, in their place, what the cross-validation measured of the recipe on patients
its fold models never saw, calibrated and called by scoring context
(``training.contexts``; the model's ``oof_metrics``): a paragraph, and a table per scoring
mode, data folder and context. No number in a card is typed by hand.
"""

from __future__ import annotations

from .schema import ModelMeta

HEADLINE, NUMBERS = "<!-- headline -->", "<!-- numbers -->"
MODES = {"context": "with neighbours", "thinned": "a random 5-60% of each patient's patches",
         "lone": "each patch alone"}  # fmt: skip


def fill_card(text: str, meta: ModelMeta) -> str:
    """``text`` with its markers replaced by ``meta``'s measured numbers (as it is when the
    model has none: a model not made by ``cv --final``)."""
    reports = meta.oof_metrics
    if not reports.get("by_mode"):
        return text
    table = numbers_table(reports)
    if reports.get("by_alpha"):
        table += "\n\n" + alpha_table(reports["by_alpha"])
    if reports.get("seed_spread"):
        table += "\n\n" + spread_table(reports["seed_spread"])
    return text.replace(HEADLINE, headline(reports, meta)).replace(NUMBERS, table)


def headline(reports: dict, meta: ModelMeta) -> str:
    """One paragraph: with neighbours per data folder (whole patients, scattered ones),
    the other modes over every patient: AUC, balanced accuracy, ECE, and the share
    decided with sensitivity and specificity among the decided."""
    alpha = meta.contexts[0].get("alpha") if meta.contexts else None
    parts = []
    for key, r in reports["by_mode"].items():
        mode, folder = key.split("/")
        if (folder == "all") == (mode == "context"):
            continue  # with neighbours per folder (whole, scattered); the others pooled
        who = f"{r['n_patients']} patients" + ("" if folder == "all" else f" of {folder}")
        parts.append(
            f"{who}, {MODES.get(mode, mode)}: AUC {_f(r['auc'])}, balanced accuracy "
            f"{_f(r['balanced_accuracy'])}, ECE {_f(r['ece'])}, {_pct(r['coverage'])} decided "
            f"(sensitivity {_f(r['sensitivity_decided'])}, specificity "
            f"{_f(r['specificity_decided'])})"
        )
    at = f" (alpha {alpha})" if alpha is not None else ""
    text = "Out of fold, calibrated and called by scoring context" + at + ": " + "; ".join(parts)
    return text + "." + _spread_sentence(reports.get("seed_spread"))


def _spread_sentence(spread: dict | None) -> str:
    """How far the recipe's training seed moved the numbers with neighbours, or nothing."""
    if not spread:
        return ""
    parts = [
        f"{cohort.partition('/')[2]}, AUC {_span(r['auc'])}, ECE {_span(r['ece'])}"
        for cohort, r in spread["cohorts"].items()
        if cohort.startswith("context/")
    ]
    return (
        f" Over training seeds {_seeds(spread)} of the recipe on the same folds, "
        f"with neighbours: {'; '.join(parts)}."
    )


def spread_table(spread: dict) -> str:
    """Markdown: per cohort, each metric's lowest and highest over the training seeds."""
    lines = [f"Lowest and highest over training seeds {_seeds(spread)} (same folds):", "",
             "| scored | AUC | ECE | bal. acc. | F1 | decided |", "|" + "---|" * 6]  # fmt: skip
    for cohort, r in spread["cohorts"].items():
        mode, _, folder = cohort.partition("/")
        cells = [f"{MODES.get(mode, mode)}: {folder}"]
        cells += [_span(r.get(k)) for k in ("auc", "ece", "balanced_accuracy", "f1", "decided")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alpha_table(by_alpha: dict) -> str:
    """Markdown: per ``--alpha`` the band was fitted at, per scoring mode and data folder,
    the share decided and sensitivity / specificity among the decided."""
    cohorts = list(next(iter(by_alpha.values())))
    names = [f"{MODES.get(m, m)}: {f}" for m, _, f in (c.partition("/") for c in cohorts)]
    lines = [
        "What `--alpha` does (the share decided, then sensitivity / specificity among the "
        "decided):",
        "",
        "| alpha | " + " | ".join(names) + " |",
        "|" + "---|" * (len(cohorts) + 1),
    ]
    for alpha, r in by_alpha.items():
        cells = [
            f"{_pct(r[c]['coverage'])} ({_f(r[c]['sensitivity_decided'])} / "
            f"{_f(r[c]['specificity_decided'])})"
            for c in cohorts
        ]
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seeds(spread: dict) -> str:
    return ", ".join(str(seed) for seed in sorted(seed for _, seed in spread["seeds"]))


def _span(lo_hi) -> str:
    return "n/a" if lo_hi is None else f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}"


def numbers_table(reports: dict) -> str:
    """Markdown: a row per scoring mode and data folder, then per context."""
    head = ("| scored | patients | patches | AUC [95% CI] | ECE [95% CI] | bal. acc. | F1 | decided "
            "| sens. decided | spec. decided |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for part in ("by_mode", "by_context"):
        for name, r in reports.get(part, {}).items():
            mode, _, folder = name.partition("/")
            label = f"{MODES.get(mode, mode)}: {folder}" if folder else name
            cells = [label, r["n_patients"], f"{r['n']:,}", _with_ci(r, "auc"), _with_ci(r, "ece")]
            cells += [_f(r[k]) for k in ("balanced_accuracy", "f1", "coverage")]
            cells += [_f(r[k]) for k in ("sensitivity_decided", "specificity_decided")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _with_ci(report: dict, key: str) -> str:
    lo, hi = report.get("ci95", {}).get(key, (None, None))
    return _f(report[key]) + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
