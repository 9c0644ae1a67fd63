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
    return text.replace(HEADLINE, headline(reports, meta)).replace(NUMBERS, numbers_table(reports))


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
    return (
        "Out of fold, calibrated and called by scoring context" + at + ": " + "; ".join(parts) + "."
    )


def numbers_table(reports: dict) -> str:
    """Markdown: a row per scoring mode and data folder, then per context."""
    head = ("| scored | patients | patches | AUC [95% CI] | ECE | bal. acc. | F1 | decided "
            "| sens. decided | spec. decided |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for part in ("by_mode", "by_context"):
        for name, r in reports.get(part, {}).items():
            lo, hi = r.get("ci95", {}).get("auc", (None, None))
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
            mode, _, folder = name.partition("/")
            label = f"{MODES.get(mode, mode)}: {folder}" if folder else name
            cells = [label, r["n_patients"], f"{r['n']:,}", f"{_f(r['auc'])}{ci}"]
            cells += [_f(r[k]) for k in ("ece", "balanced_accuracy", "f1", "coverage")]
            cells += [_f(r[k]) for k in ("sensitivity_decided", "specificity_decided")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"
