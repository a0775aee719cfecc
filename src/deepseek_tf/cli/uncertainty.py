"""The `--uncertainty` part of `deepseek-tf eval`: choose the method, check the runs, run
the evaluation (and OOD detection), write the plots."""

from __future__ import annotations

import tempfile
from pathlib import Path


def _ensemble(args, config, model, tokenizer):
    """The member models of `--ensemble`, each checked to share the tokenizer."""
    from deepseek_tf.api import load
    from deepseek_tf.errors import InputError

    members = [model]
    for run in args.ensemble:
        member, member_tokenizer = load(run)
        same = (
            member_tokenizer is not None
            and type(member_tokenizer) is type(tokenizer)
            and member_tokenizer.vocab_size == tokenizer.vocab_size
            and [member_tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
            == [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        )
        if not same:
            raise InputError(
                f"--ensemble {run}: its tokenizer differs from {args.run_dir}'s; an ensemble "
                "averages distributions over one vocabulary"
            )
        if member.vocab_size != model.vocab_size:
            raise InputError(f"--ensemble {run}: vocabulary {member.vocab_size} is not "
                             f"{model.vocab_size}")  # fmt: skip
        members.append(member)
    return members


def _ood_files(args, tokenizer, scratch: Path) -> list[str]:
    """`--ood-data` files; with `--drop-unknown`, copies without the characters a char
    tokenizer cannot represent."""
    from deepseek_tf.data.corpus import read_texts, resolve_files

    files = resolve_files(args.ood_data)
    if not args.drop_unknown or getattr(tokenizer, "kind", "") != "char":
        return files
    known = set(tokenizer.chars)
    out = []
    for i, text in enumerate(read_texts(files)):
        path = scratch / f"ood_{i}.txt"
        path.write_text("".join(c for c in text if c in known), encoding="utf-8")
        out.append(str(path))
    return out


def uncertainty_result(args, config, model, tokenizer, dataset) -> dict:
    """The `"uncertainty"` entry of `eval`'s JSON (and its `"ood"` part)."""
    from deepseek_tf.uncertainty.evaluate import collect, ood_report, uncertainty_report
    from deepseek_tf.uncertainty.predictive import Predictor

    if args.ensemble:
        predictor = Predictor(_ensemble(args, config, model, tokenizer), "ensemble")
    elif args.mc_samples is not None:
        predictor = Predictor(model, "mc_dropout", samples=args.mc_samples)
    else:
        predictor = Predictor(model, "model", samples=args.samples)
    collected = collect(predictor, dataset(), args.max_batches)
    summary = uncertainty_report(collected, predictor)
    curve = summary.pop("curve")
    if args.plot:
        from deepseek_tf.uncertainty.plots import reliability_diagram, risk_coverage_plot

        directory = Path(args.plot)
        directory.mkdir(parents=True, exist_ok=True)
        title = f"{Path(args.run_dir).name} ({predictor.method}, {predictor.samples} sample(s))"
        summary["plots"] = [
            str(reliability_diagram(collected["confidence"], collected["correct"],
                                    directory / "reliability.png", title)),
            str(risk_coverage_plot(curve["coverage"], curve["risk"],
                                   directory / "risk_coverage.png")),
        ]  # fmt: skip
    if args.ood_data:
        with tempfile.TemporaryDirectory() as scratch:
            files = _ood_files(args, tokenizer, Path(scratch))
            other = collect(predictor, dataset(files, "all"), args.max_batches)
        summary["ood"] = ood_report(collected, other)
    return summary
