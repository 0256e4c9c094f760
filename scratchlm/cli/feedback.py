"""scratchlm feedback select | build: the human-feedback loop."""

import argparse
import sys
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP


def add_commands(stages: argparse._SubParsersAction) -> None:
    fb = stages.add_parser(
        "feedback",
        help="the human-feedback loop: pick what the model is unsure of, turn reviews into training data",
        description="select: answer a pool of prompts and write the answers the model is least sure of for review. "
        "build: turn reviewed files (and the web chat page's feedback.jsonl) into SFT and DPO data.",
    )
    steps = fb.add_subparsers(title="steps", metavar="STEP")
    sel = steps.add_parser(
        "select",
        help="score prompts by the model's uncertainty and write the most uncertain for review",
        description="Answer each prompt greedily and score the answer by the model's uncertainty: mean next-token "
        "entropy over its tokens (entropy), or one minus the mean gap between the two likeliest tokens (margin). "
        "The --top most uncertain go to --out (JSONL, or CSV when it ends in .csv) with empty `rating` and "
        "`edited` fields for a reviewer to fill in. " + MODEL_HELP,
    )
    sel.add_argument("model", type=Path, help="the model (see above)")
    sel.add_argument("--prompts", type=Path, required=True,
                     help='JSONL pool: {"prompt": text} or {"messages": [...]} a line, optional "id"')
    sel.add_argument("--out", type=Path, required=True, help="review file to write (.jsonl or .csv)")
    sel.add_argument("--top", type=int, default=20, help="how many to keep for review (default: 20)")
    sel.add_argument("--method", choices=["entropy", "margin"], default="entropy", help="uncertainty measure (default: entropy)")
    sel.add_argument("--max-new-tokens", type=int, default=64, help="length of each answer (default: 64)")
    sel.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    sel.set_defaults(run=_feedback_select)
    bld = steps.add_parser(
        "build",
        help="turn reviews into SFT conversations and DPO pairs",
        description="Read reviewed files from `feedback select` (JSONL or CSV) and the web chat page's feedback.jsonl. "
        "A reply rated up becomes an SFT conversation; an edited reply becomes an SFT conversation with the edit "
        "and a DPO pair (chosen: the edit, rejected: the model's reply); rated down without an edit, or not "
        "reviewed, is skipped and counted. The latest review of a reply wins.",
    )
    bld.add_argument("reviews", type=Path, nargs="+", help="reviewed files")
    bld.add_argument("--sft", type=Path, default=None, help='SFT JSONL to write ({"messages": [...]})')
    bld.add_argument("--dpo", type=Path, default=None, help='DPO JSONL to write ({"prompt", "chosen", "rejected"})')
    bld.set_defaults(run=_feedback_build)


def _feedback_select(args: argparse.Namespace) -> int:
    from scratchlm.finetune.feedback import select_for_review

    selection = select_for_review(args.model, args.prompts, args.out, top=args.top, method=args.method,
                                  max_new_tokens=args.max_new_tokens, device=args.device,
                                  note=lambda line: print(line, file=sys.stderr))
    print(f"{len(selection.chosen)} of {selection.scored} answers for review -> {args.out} (fill in rating and/or edited, then: "
          f"scratchlm feedback build {args.out} --sft sft.jsonl --dpo dpo.jsonl)")
    return 0


def _feedback_build(args: argparse.Namespace) -> int:
    from scratchlm.finetune.feedback import build_datasets

    report = build_datasets(args.reviews, args.sft, args.dpo)
    print(report.summary())
    return 0
