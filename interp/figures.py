"""`make figures`: run the analyses on the zoo's pairs and write a gallery.

Each figure section is a function ``(context) -> list[Figure]`` registered in
:data:`SECTIONS`; an analysis adds its section there. A section's result is
cached under a content key (the pair checkpoints' identities + the section's
options + interp's source), so a warm run only re-renders what changed.
``figures/index.html`` links every figure; ``figures/findings.md`` holds the
measured numbers each section reports.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from interp.plots.style import write_if_changed

FIGURE_SUFFIXES = (".png", ".html")


@dataclass
class Figure:
    """One gallery entry: files written (without suffix) and a caption."""

    stem: str
    title: str
    caption: str


@dataclass
class Context:
    """What a section needs: where to write, the pairs to compare, and a findings log."""

    out: Path
    pairs: dict[str, object]
    findings: list[str] = field(default_factory=list)
    progress: bool = True

    def path(self, stem: str) -> Path:
        return self.out / stem

    def save(self, stem: str, figure, interactive, title: str, caption: str) -> Figure:
        """Write ``stem.png`` (matplotlib) and ``stem.html`` (plotly); return the gallery entry."""
        from interp.plots.style import save_matplotlib, save_plotly

        save_matplotlib(figure, self.path(stem))
        save_plotly(interactive, self.path(stem))
        return Figure(stem, title, caption)


def _weight_change_section(ctx: Context) -> list[Figure]:
    from interp.analysis.weight_change import weight_change
    from interp.plots.weight_change import weight_change_figure, weight_change_plotly

    result = weight_change(list(ctx.pairs.values()), progress=ctx.progress)
    summary = result.summary()
    ctx.findings.append("## Weight change\n\n" + summary.to_markdown(index=False, floatfmt=".4g"))
    return [ctx.save("weight_change", weight_change_figure(result), weight_change_plotly(result),
                     "Relative weight change per matrix",
                     "‖ΔW‖_F / ‖W₀‖_F for every attention and MLP matrix, per fine-tune.")]


def _section(module: str) -> Callable[[Context], list[Figure]]:
    """The ``section`` function of ``interp.sections.<module>``, imported when it runs."""

    def run(ctx: Context) -> list[Figure]:
        import importlib

        return importlib.import_module(f"interp.sections.{module}").section(ctx)

    return run


#: (name, section function); analyses append theirs.
SECTIONS: list[tuple[str, Callable[[Context], list[Figure]]]] = [
    ("weight_change", _weight_change_section),
    ("intruders", _section("intruders")),
    ("grafting", _section("grafting")),
    ("patching", _section("patching")),
    ("context", _section("context")),
]


def zoo_pairs(task: str = "intent") -> dict[str, object]:
    """The zoo's LoRA r=1/8/64, rsLoRA r=64 and full-FT pairs for ``task``, built if missing."""
    from interp import zoo

    variants = [("lora", 1), ("lora", 8), ("lora", 64), ("rslora", 64), ("full", None)]
    pairs = {}
    for method, rank in variants:
        pair = zoo.pair(task, method, rank)
        pairs[pair.label] = pair
    return pairs


def make_figures(out: str | Path = "figures", sections: list[str] | None = None,
                 progress: bool = True) -> list[Figure]:
    """Regenerate every figure (or the named ``sections``) under ``out``; returns the gallery."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, pairs=zoo_pairs(), progress=progress)
    gallery: list[Figure] = []
    for name, section in SECTIONS:
        if sections and name not in sections:
            continue
        start = time.perf_counter()
        gallery.extend(section(ctx))
        if progress:
            print(f"[figures] {name}: {time.perf_counter() - start:.1f} s")
    write_gallery(out, gallery)
    findings = "# Findings (measured on the built-in zoo)\n\n" + "\n\n".join(ctx.findings) + "\n"
    write_if_changed(out / "findings.md", findings.encode())
    return gallery


def write_gallery(out: Path, gallery: list[Figure]) -> Path:
    """``index.html``: each figure's PNG, linking to its interactive HTML."""
    cards = []
    for figure in gallery:
        stem = html.escape(figure.stem)
        cards.append(
            f'<section><h2>{html.escape(figure.title)}</h2>'
            f'<a href="{stem}.html"><img src="{stem}.png" alt="{html.escape(figure.title)}"></a>'
            f'<p>{html.escape(figure.caption)} <a href="{stem}.html">interactive</a></p></section>'
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>interp figures</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "section{margin-bottom:2em}</style></head><body><h1>interp: LoRA vs full fine-tuning "
        "on the built-in zoo</h1><p>See <a href='findings.md'>findings.md</a> for the numbers.</p>"
        + "".join(cards) + "</body></html>"
    )
    write_if_changed(out / "index.html", page.encode())
    return out / "index.html"


def gallery_files(out: str | Path) -> list[Path]:
    """Every file ``index.html`` names (for the test that they all exist and are non-empty)."""
    import re

    text = (Path(out) / "index.html").read_text()
    names = sorted(set(re.findall(r'(?:src|href)="([^"]+)"', text)))
    return [Path(out) / name for name in names]
