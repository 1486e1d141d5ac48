"""The ``interp`` command: ``interp zoo build``, ``interp figures``, ``interp report``."""

from __future__ import annotations

import argparse
import os
import sys


def _offline() -> None:
    # Never stall on a hub lookup: interp reads only local files and caches.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _zoo(args: argparse.Namespace) -> int:
    from interp import zoo

    if args.action == "build":
        zoo.build(progress=True)
    elif args.action == "list":
        for line in zoo.describe():
            print(line)
    return 0


def _figures(args: argparse.Namespace) -> int:
    if args.real:
        from interp.sections.real import make_real_figures

        out = args.out if args.out != "figures" else "figures/real"
        gallery = make_real_figures(out)
        print(f"wrote {len(gallery)} figures; open {out}/index.html")
        return 0
    from interp.figures import make_figures

    gallery = make_figures(args.out, sections=args.section or None)
    print(f"wrote {len(gallery)} figures; open {args.out}/index.html")
    return 0


def _report(args: argparse.Namespace) -> int:
    from interp.errors import InterpError
    from interp.report import make_report

    try:
        page = make_report(args.base, args.finetuned, task=args.task, out=args.out,
                           labels=args.label, k=args.k, eps=args.eps)
    except InterpError as error:
        print(f"interp report: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _offline()
    parser = argparse.ArgumentParser(prog="interp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    zoo_parser = commands.add_parser("zoo", help="build or list the built-in model zoo")
    zoo_parser.add_argument("action", choices=["build", "list"])
    zoo_parser.set_defaults(run=_zoo)

    figures = commands.add_parser("figures", help="regenerate every figure on the zoo")
    figures.add_argument("--out", default="figures")
    figures.add_argument("--section", action="append", help="only this section (repeatable)")
    figures.add_argument("--real", action="store_true",
                         help="the SmolLM2 case instead (needs `make real`); writes figures/real")
    figures.set_defaults(run=_figures)

    report = commands.add_parser(
        "report", help="run every analysis that applies on your own checkpoints")
    report.add_argument("base", help="base model: folder, hub id in the local cache, or .gguf")
    report.add_argument("finetuned", nargs="+", help="fine-tuned folders, PEFT adapters or .gguf")
    report.add_argument("--task", help="a zoo task name or a task JSON file (Task.save)")
    report.add_argument("--out", default="report")
    report.add_argument("--label", action="append", help="a label per fine-tune, in order")
    report.add_argument("--k", type=int, default=10, help="top-k tuned vectors tested for intruders")
    report.add_argument("--eps", type=float, default=0.5, help="intruder cosine threshold")
    report.set_defaults(run=_report)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
