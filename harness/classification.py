"""Scores of a classifier from its confusion matrix: accuracy, macro-F1, per-class precision / recall /
F1, and the report written at the end of a task=classification run.

confusion[i][j] counts validation samples of true class i predicted as class j (summed over ranks).
"""

from __future__ import annotations


def scores(confusion: list[list[int]]) -> dict:
    """{"accuracy", "f1" (macro: the unweighted mean of the per-class F1), "per_class": [{precision,
    recall, f1, support}]}. A class with no true and no predicted sample scores F1 0 (as scikit-learn's
    zero_division=0), so macro-F1 never hides a class the model never predicts."""
    n = len(confusion)
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(n))
    per_class = []
    for c in range(n):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(n))
        support = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (predicted + support) if predicted + support else 0.0
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    return {"accuracy": correct / total if total else 0.0, "f1": sum(p["f1"] for p in per_class) / n if n else 0.0,
            "per_class": per_class}


def report_markdown(confusion: list[list[int]], labels: list[str], step: int, before: dict | None = None) -> str:
    """The final report: the confusion matrix (rows: true class, columns: predicted) and per-class scores."""
    s = scores(confusion)
    lines = [f"# Classification report (validation set, step {step})", ""]
    if before is not None:
        lines += [f"accuracy {100 * before['accuracy']:.1f}% -> {100 * s['accuracy']:.1f}%, macro-F1 {before['f1']:.3f} -> {s['f1']:.3f} "
                  "(before training -> after)", ""]
    else:
        lines += [f"accuracy {100 * s['accuracy']:.1f}%, macro-F1 {s['f1']:.3f}", ""]
    lines += ["## Confusion matrix (rows: true class, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {labels[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(confusion)]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {labels[i]} | {p['precision']:.3f} | {p['recall']:.3f} | {p['f1']:.3f} | {p['support']} |"
              for i, p in enumerate(s["per_class"])]
    return "\n".join(lines) + "\n"
