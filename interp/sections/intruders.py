"""`make figures` section: intruder dimensions of the zoo's intent fine-tunes (methods.md §1).

Runs :func:`interp.intruder_dimensions` on every pair in ``ctx.pairs``, keeps
the full similarity matrix of the matrix with the most intruders for the heat
map, and sweeps the mitigation λ on the LoRA pair with the most intruders
(held-out pretraining text of the zoo's world against intent accuracy). The
results are cached under a content key (weights, options, this code), so a
warm rerun only redraws.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from interp.cache import content_key, entry
from interp.sections import source_digest

VERSION = 1
K, EPS = 10, 0.5
LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)
N_TEXTS, N_TASK = 256, 200
_SOURCES = ("analysis/intruders.py", "analysis/intruders_svd.py",
            "analysis/intruders_mitigation.py", "sections/intruders.py")






def _pretraining_text(n: int) -> list[str]:
    """Held-out documents of the zoo base's pretraining mixture (the gallery's pairs are the zoo's)."""
    from interp import zoo

    return zoo.pretraining_text(n)


def _tradeoff_pair(report, pairs: dict[str, Any]):
    """The LoRA pair with the most intruders (ties: lowest rank), the one mitigation is for."""
    counts = report.counts().set_index("pair")["n_intruders"]
    lora = [label for label, pair in pairs.items() if pair.adapter is not None]
    if not lora:
        return None
    return pairs[max(lora, key=lambda label: (counts[label], -(pairs[label].lora_rank or 0)))]


def compute(ctx) -> tuple[Any, Any]:
    """The report (with one full similarity matrix) and the λ trade-off, cached by content."""
    from interp.analysis.intruders import IntruderReport, intruder_dimensions
    from interp.analysis.intruders_mitigation import IntruderTradeoff, intruder_tradeoff
    from interp.plots.intruders import busiest_matrix

    pairs = dict(ctx.pairs)
    key = content_key("section.intruders", VERSION, K, EPS, LAMS, N_TEXTS, N_TASK,
                      [p.identity() for p in pairs.values()], source_digest(*_SOURCES))
    folder = entry("sections", f"intruders-{key}")
    if (folder / "report" / "result.json").exists():
        tradeoff = None
        if (folder / "tradeoff" / "result.json").exists():
            tradeoff = IntruderTradeoff.load(folder / "tradeoff")
        return IntruderReport.load(folder / "report"), tradeoff
    report = intruder_dimensions(list(pairs.values()), k=K, eps=EPS, progress=ctx.progress)
    matrix = busiest_matrix(report)
    full = intruder_dimensions(list(pairs.values()), k=K, eps=EPS, matrices=[matrix],
                               keep_full=[matrix], progress=False)
    report = dataclasses.replace(report, full_similarity=full.full_similarity)
    tradeoff = None
    target = _tradeoff_pair(report, pairs)
    if target is not None and target.task:
        from interp import zoo

        task = zoo.task(target.task, "test", n=N_TASK)
        tradeoff = intruder_tradeoff(target, task, _pretraining_text(N_TEXTS), LAMS,
                                     k=K, eps=EPS, progress=ctx.progress)
    report.save(folder / "report")
    if tradeoff is not None:
        tradeoff.save(folder / "tradeoff")
    return report, tradeoff


def findings(report, tradeoff) -> str:
    """Markdown with the measured numbers."""
    summary = report.summary()
    sweep = report.sweep([0.3, 0.5, 0.7, 0.9]).pivot(index="pair", columns="eps",
                                                      values="n_intruders")
    sweep = sweep.loc[report.labels]
    sweep.columns = [f"ε={c:g}" for c in sweep.columns]
    from interp.plots.style import MODULE_ORDER

    modules = report.counts(by=("pair", "module")).pivot(index="pair", columns="module",
                                                         values="n_intruders").loc[report.labels]
    modules = modules[[m for m in MODULE_ORDER if m in modules.columns]]
    text = [
        "## Intruder dimensions (methods.md §1)",
        (f"Top k = {report.k} left singular vectors of every q/k/v/o/gate/up/down matrix; an "
         f"intruder has max |cos| < ε = {report.eps:g} with every base left singular vector."),
        "",
        summary[["pair", "n_matrices", "n_intruders", "matrices_with_intruders",
                 "lowest_top1_max_sim"]].to_markdown(index=False, floatfmt=".3g"),
        "",
        "Counts at other thresholds (re-thresholded, no new SVDs):",
        "",
        sweep.reset_index().to_markdown(index=False),
        "",
        "Per module kind (ε = 0.5):",
        "",
        modules.reset_index().to_markdown(index=False),
    ]
    if tradeoff is not None:
        t = tradeoff.table
        ref = tradeoff.reference
        text += [
            "",
            (f"Scaling the intruders of **{tradeoff.options['pair']}** by λ "
             f"({int(t['n_intruders_scaled'].iloc[0])} directions; base: pretraining loss "
             f"{ref['base_pretrain_loss']:.4f}, {tradeoff.options['task']} accuracy "
             f"{ref['base_task_accuracy']:.3f}):"),
            "",
            t[["lam", "pretrain_loss", "task_accuracy"]].to_markdown(index=False, floatfmt=".4f"),
        ]
    return "\n".join(text)


def section(ctx) -> list:
    """Figures and findings for the gallery."""
    from interp.plots import intruders as plots

    report, tradeoff = compute(ctx)
    matrix = next(iter(report.full_similarity)).split("|", 1)[1] if report.full_similarity \
        else plots.busiest_matrix(report)
    made = [
        ("intruders_similarity", plots.intruder_similarity_figure(report, matrix),
         plots.intruder_similarity_plotly(report, matrix),
         f"Intruder similarity heat map ({matrix})",
         (f"|Utᵀ U0| for {matrix}: each row a fine-tuned left singular vector, each column a "
          "base one. A bright cell per row means the direction existed before; a dark row is "
          "an intruder (red marker).")),
        ("intruders_eps", plots.intruder_eps_figure(report), plots.intruder_eps_plotly(report),
         "Intruder count vs ε",
         ("Model-level intruder count among the top-10 vectors of every matrix as the cosine "
          "threshold ε varies, per fine-tune.")),
        ("intruders_layers", plots.intruder_layers_figure(report),
         plots.intruder_layers_plotly(report), "Where the intruders are",
         "Intruders per layer and module at ε = 0.5, per fine-tune."),
        ("intruders_rank", plots.intruder_rank_figure(report), plots.intruder_rank_plotly(report),
         "Intruders vs LoRA rank",
         ("Model-level count against LoRA rank (LoRA, rsLoRA); full fine-tuning as a dashed "
          "line.")),
    ]
    if tradeoff is not None:
        caption = ("Held-out pretraining loss and task accuracy as the intruder directions of "
                   f"{tradeoff.options['pair']} are scaled by λ (1 = fine-tuned, 0 = removed).")
        made.append(("intruders_tradeoff", plots.intruder_tradeoff_figure(tradeoff),
                     plots.intruder_tradeoff_plotly(tradeoff), "Scaling intruders: the λ trade-off",
                     caption))
    figures = [ctx.save(*entry) for entry in made]
    ctx.findings.append(findings(report, tradeoff))
    return figures


__all__ = ["compute", "findings", "section"]
