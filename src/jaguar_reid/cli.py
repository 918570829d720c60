"""The commands: every step of the pipeline by name, with one line of help and the config
sections it reads. `jaguar-reid <step> [key=value ...]` (the console script) runs one;
`python -m jaguar_reid.<step>`, `bash train.sh` and `python submit.py` are the same commands.

    jaguar-reid --help                  the steps
    jaguar-reid <step> --help           the keys the step reads, with default, role and doc
    jaguar-reid <step> --print-config   the resolved config as YAML, then exit
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from jaguar_reid import keys
from jaguar_reid.io_utils import run_main
from jaguar_reid.schema import bounds_text

PROG = "jaguar-reid"


@dataclass(frozen=True)
class Step:
    """One command: where its `main(argv)` lives, what it does, which sections it reads."""

    module: str
    summary: str
    sections: tuple[str, ...]
    translate: str = ""  # a function of `module` turning the step's own shorthands into keys
    own_parser: bool = False  # the step parses its arguments itself (argparse; --help too)
    also: str = ""  # other ways to start it, beside python -m jaguar_reid.<step>


_DATA = ("data", "cache", "folds")
STEPS: dict[str, Step] = {
    "demo_data": Step("jaguar_reid.data.demo", "write the synthetic demo data set "
                      "(input/demo)", (), own_parser=True),
    "datacheck": Step("jaguar_reid.data.audit", "report on the data: identities, sizes, masks, "
                      "near-duplicates, every problem", _DATA),
    "cache": Step("jaguar_reid.data.image_cache", "decode every image once into the "
                  "preprocessing cache", ("data", "cache")),
    "folds": Step("jaguar_reid.data.splits", "write the cross-validation folds file", _DATA),
    "train": Step("jaguar_reid.train", "train folds (fold=0..4), resumable; skips finished "
                  "folds of the same recipe", (*_DATA, "model", "train", "loss", "aug", "embed",
                                               "floor", "report"), also="bash train.sh"),
    "embed": Step("jaguar_reid.retrieval.embedding", "embed each finished fold's validation "
                  "images under every view, for tuning", (*_DATA, "embed", "tune", "submit")),
    "scoring": Step("jaguar_reid.retrieval.oof", "the out-of-fold scores of an experiment",
                    (*_DATA, "model", "floor", "report")),
    "tune": Step("jaguar_reid.retrieval.search", "choose views and post-processing out of fold",
                 (*_DATA, "embed", "post", "tune", "local", "submit")),
    "submit": Step("jaguar_reid.submission", "write submission.csv (and score it where test "
                   "labels exist)", (*_DATA, "embed", "post", "local", "submit", "floor",
                                     "report"), also="python submit.py"),
    "pseudo": Step("jaguar_reid.pseudo", "pseudo-label test images at an out-of-fold "
                   "precision", (*_DATA, "embed", "submit", "pseudo")),
    "export": Step("jaguar_reid.export", "carry trained folds to another machine as one folder "
                   "(out=DIR)", (*_DATA, "submit", "export"), translate="command_line"),
    "report": Step("jaguar_reid.reporting.page", "rebuild an experiment's HTML report",
                   (*_DATA, "report")),
    "leaderboard": Step("jaguar_reid.reporting.runs", "every run so far, ranked",
                        ("report",)),
    "sweep": Step("jaguar_reid.sweep", "a grid of recipes trained in turn, ranked out of fold "
                  "with their noise", ("sweep", "folds", "tune"),
                  own_parser=True),
    "calibrate": Step("jaguar_reid.identify.calibrate", "fit out of fold what identify needs: "
                      "probabilities, the new-individual threshold",
                      (*_DATA, "embed", "identify"),
                      also="python -m jaguar_reid.identify.calibrate"),
    "identify": Step("jaguar_reid.identify.command", "name the known individual in each photo, "
                     "or call it new (PHOTO_OR_FOLDER ... models=PATH)",
                     (*_DATA, "embed", "local", "identify"), translate="config_arguments",
                     also="python -m jaguar_reid.identify.command"),
}
_TOP = tuple(name for name in keys.SPECS if "." not in name)


def steps_help() -> str:
    width = max(map(len, STEPS))
    lines = [f"usage: {PROG} <step> [key=value ...] [--help] [--print-config]", "",
             "steps:"]
    lines += [f"  {name:<{width}}  {step.summary}" for name, step in STEPS.items()]
    lines += ["", "python -m jaguar_reid.<step> runs the same; bash train.sh = jaguar-reid train; "
              "python submit.py = jaguar-reid submit",
              f"{PROG} <step> --help lists the keys a step reads"]
    return "\n".join(lines)


def _key_line(name: str) -> str:
    spec = keys.SPECS[name]
    values = bounds_text(spec)
    head = f"  {name} = {spec.default!r}  [{spec.role}]" + (f"  ({values})" if values else "")
    doc = textwrap.fill(spec.doc, 96, initial_indent="      ", subsequent_indent="      ")
    return f"{head}\n{doc}"


def step_help(name: str) -> str:
    step = STEPS[name]
    start = step.also or f"python -m jaguar_reid.{name}"
    lines = [f"usage: {PROG} {name} [config=configs/X.yaml] [key=value ...]",
             f"       (or {start} ...)", "", step.summary, "",
             "config=PATH  an experiment YAML (base: default.yaml and a few keys)",
             "--print-config  print the resolved config as YAML and exit", ""]
    for section in ("", *step.sections):
        names = _TOP if not section else [n for n in keys.SPECS
                                          if n.startswith(section + ".")]
        lines.append(f"{section or 'top-level'} keys:")
        lines += [_key_line(n) for n in names]
    return "\n".join(lines)


def _print_config(step: Step, argv: list[str]) -> None:
    from jaguar_reid.config import dump_config, load_config

    print(dump_config(load_config(_translated(step, argv))), end="")


def _translated(step: Step, argv: list[str]) -> list[str]:
    if not step.translate:
        return argv
    return getattr(importlib.import_module(step.module), step.translate)(argv)


def _main_of(step: Step) -> Callable[[list[str]], object]:
    return importlib.import_module(step.module).main


def _say(text: str) -> None:
    """Print help; a reader that closes the pipe early (`| head`) ends it quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_step(name: str, argv: list[str] | None = None) -> None:
    """Run step `name` with `argv` (default: the process's arguments): --help and
    --print-config answered here, a user's mistake one line on stderr and exit 2."""
    step = STEPS[name]
    argv = sys.argv[1:] if argv is None else list(argv)
    if step.own_parser:
        run_main(_main_of(step), argv)
    elif {"-h", "--help"} & set(argv):
        _say(step_help(name))
    elif "--print-config" in argv:
        run_main(lambda args: _print_config(step, args),
                 [a for a in argv if a != "--print-config"])
    else:
        run_main(_main_of(step), argv)


def main(argv: list[str] | None = None) -> None:
    """The `jaguar-reid` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _say(steps_help())
        return
    if argv[0] not in STEPS:
        print(f"error: unknown step {argv[0]!r}; one of {', '.join(STEPS)} "
              f"({PROG} --help)", file=sys.stderr)
        raise SystemExit(2)
    run_step(argv[0], argv[1:])


if __name__ == "__main__":
    main()
