"""The ``pvtune`` command line. Only this module parses arguments; it builds typed configs
and calls the library.

    pvtune compress                      # AQLM 2x8g8 on the offline default model and text
    pvtune compress --preset demo        # the same, sized to finish in about 10 minutes
    pvtune compress MODEL_DIR --method gptq --bits 3 --output out/
    pvtune finetune out/ --strategy subspace_v_ste --steps 50   # PV-Tuning
    pvtune eval out/                     # perplexity, tokens/s, a generation sample
    pvtune generate out/ --prompt "..."  # free prompts
    pvtune reprs                         # every representation on one random layer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("pvtune")

SAMPLE_PROMPT = "The history of the Roman Empire"


# --------------------------------------------------------------------------------------
# helpers shared by the LLM commands


def _load_texts(path: str | None, split: str) -> list[str]:
    from pvtune.llm.data import default_texts, read_texts

    return default_texts(split) if path is None else read_texts(path)


def _eval_config(args: argparse.Namespace, default):
    from pvtune.llm.data import EvalConfig

    return EvalConfig(
        window=args.eval_window or default.window,
        max_windows=args.eval_windows if args.eval_windows is not None else default.max_windows,
        batch_size=default.batch_size,
    )


def _evaluate(model, tokenizer, windows, label: str) -> dict:
    from pvtune.llm.evaluate import perplexity

    result = perplexity(model, windows)
    log.info("%s: perplexity %.3f on %d tokens (%.0f tokens/s)", label, result.perplexity,
             result.tokens, result.tokens_per_second)
    return {"perplexity": result.perplexity, "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second}


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="evaluation text (.txt or .jsonl with a 'text' field); "
                   "default: the evaluation split of the offline Wikipedia text")
    p.add_argument("--eval-window", type=int, help="tokens per evaluation window (512)")
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows (all)")


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


def _compress_config(args: argparse.Namespace, preset):
    from pvtune.init.gptq import GPTQConfig
    from pvtune.init.rtn import RTNConfig
    from pvtune.llm.data import CalibrationConfig
    from pvtune.llm.pipeline import BlockFinetuneConfig, CompressConfig
    from pvtune.reprs import AQLMConfig, UniformConfig

    calibration = CalibrationConfig(
        num_sequences=args.num_seqs or preset.calibration.num_sequences,
        sequence_length=args.seq_len or preset.calibration.sequence_length,
        seed=args.seed,
    )
    finetune = preset.block_finetune
    if args.block_finetune_steps is not None:
        finetune = BlockFinetuneConfig(steps=args.block_finetune_steps,
                                       lr=finetune.lr if finetune else 1e-3)
    if args.method == "aqlm":
        representation = AQLMConfig.preset(args.codebooks, seed=args.seed)
        method_config = preset.aqlm
    else:
        representation = UniformConfig(bits=args.bits, group_size=args.group_size or None,
                                       symmetric=args.symmetric)
        method_config = GPTQConfig() if args.method == "gptq" else RTNConfig()
        if args.block_finetune_steps is None:
            finetune = None  # scalar methods are calibrated without block fine-tuning
    return CompressConfig(method=args.method, representation=representation,
                          method_config=method_config, calibration=calibration,
                          block_finetune=finetune)


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from pvtune.llm.checkpoint import bits_report, save_compressed, size_on_disk
    from pvtune.llm.data import calibration_batch, eval_windows, tokenize_stream
    from pvtune.llm.evaluate import generate
    from pvtune.llm.model import count_params, load_causal_lm
    from pvtune.llm.pipeline import compress_model
    from pvtune.llm.recipes import PRESETS
    from pvtune.report import format_table

    torch.manual_seed(args.seed)
    preset = PRESETS[args.preset]
    config = _compress_config(args, preset)
    eval_config = _eval_config(args, preset.evaluation)
    output = Path(args.output or f"compressed-{args.method}"
                  f"-{args.codebooks if args.method == 'aqlm' else f'{args.bits}bit'}")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"output directory {output} is not empty; pass --overwrite or "
                         "choose another --output")
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model)
    log.info("loaded %s (%.1fM parameters) in %.1f s", args.model or "the default model",
             count_params(model) / 1e6, time.perf_counter() - t0)
    calib_ids = calibration_batch(tokenize_stream(tokenizer, _load_texts(args.calib_text,
                                                                         "calibration")),
                                  config.calibration)
    results: dict = {}
    windows = None
    if not args.no_eval:
        windows = eval_windows(tokenize_stream(tokenizer, _load_texts(args.eval_text,
                                                                      "evaluation")),
                               eval_config)
        results["before"] = _evaluate(model, tokenizer, windows, "uncompressed")
    log.info("compressing: method=%s representation=%s, %d x %d calibration tokens",
             config.method, config.representation, calib_ids.shape[0], calib_ids.shape[1])
    report = compress_model(model, calib_ids, config)
    if windows is not None:
        results["after"] = _evaluate(model, tokenizer, windows, "compressed")
    sample = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    bits = bits_report(model)
    meta = {"source_model": str(args.model or "default:SmolLM2-135M-Instruct"),
            "compress_config": _jsonable(config), "evaluation": results,
            "compress_seconds": report.seconds,
            "layers": [dataclasses.asdict(r) for r in report.layers],
            "block_finetune": report.block_losses}
    save_compressed(model, tokenizer, output, meta)

    print()
    print(format_table(["layer", "shape", "bits/param", "output error", "seconds"], [
        [r.name, f"{r.out_features}x{r.in_features}", f"{r.bits_per_param:.3f}",
         "-" if r.output_error is None else f"{r.output_error:.4f}", f"{r.seconds:.1f}"]
        for r in report.layers
    ]))
    print()
    rows = [["method", f"{config.method} {_repr_name(config.representation)}"],
            ["compression time", f"{report.seconds / 60:.1f} min"],
            ["bits/param (compressed linears)", f"{bits['linear_bits_per_param']:.3f}"],
            ["bits/param (whole model)", f"{bits['overall_bits_per_param']:.3f}"],
            ["size on disk", f"{size_on_disk(output) / 2**20:.1f} MiB"],
            ["checkpoint", str(output)]]
    for key in ("before", "after"):
        if key in results:
            r = results[key]
            rows.append([f"perplexity {key}", f"{r['perplexity']:.2f} ({r['tokens']} tokens, "
                                              f"{r['tokens_per_second']:.0f} tok/s)"])
    print(format_table(["summary", "value"], rows))
    print(f"\nSample from the compressed model:\n  {args.prompt}{sample}")
    return 0


def _repr_name(rep) -> str:
    name = getattr(rep, "name", None)
    if name:
        return name
    return f"{rep.bits}-bit g{rep.group_size}{' sym' if rep.symmetric else ''}"


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **out}
    return obj


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pvtune.llm.checkpoint import read_meta, save_compressed
    from pvtune.llm.data import (
        CalibrationConfig,
        EvalConfig,
        calibration_batch,
        eval_windows,
        tokenize_stream,
    )
    from pvtune.llm.finetune import FinetuneConfig, TeacherLogits, finetune
    from pvtune.llm.model import ModelError, is_pvtune_checkpoint, load_causal_lm
    from pvtune.optim.strategies import VStepConfig
    from pvtune.report import format_table

    source = Path(args.checkpoint)
    if not is_pvtune_checkpoint(source):
        raise ModelError(f"{source} is not a pvtune checkpoint; run `pvtune compress` first")
    output = Path(args.output or f"{source}-finetuned-{args.strategy}")
    resume = output / "resume"
    if output.exists() and any(output.iterdir()) and not (resume / "resume_state.json").is_file() \
            and not args.overwrite:
        raise ValueError(f"output directory {output} is not empty and holds no resume state; "
                         "pass --overwrite or choose another --output")
    meta = read_meta(source)
    teacher_src = args.teacher
    if teacher_src is None:
        src = meta.get("source_model", "")
        teacher_src = None if src.startswith("default:") or not src else src
    student, tokenizer = load_causal_lm(source)
    teacher, _ = load_causal_lm(teacher_src)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    calib = CalibrationConfig(num_sequences=args.num_seqs, sequence_length=args.seq_len,
                              seed=args.seed)
    ids = calibration_batch(tokenize_stream(tokenizer, _load_texts(args.calib_text,
                                                                   "calibration")), calib)
    windows = None
    if not args.no_eval:
        windows = eval_windows(tokenize_stream(tokenizer, _load_texts(args.eval_text,
                                                                      "evaluation")),
                               _eval_config(args, EvalConfig(max_windows=32)))
    vstep = VStepConfig(strategy=args.strategy, lr=args.code_lr, tau=args.tau,
                        trust_ratio=args.trust_ratio, beam_size=args.beam_size, seed=args.seed)
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule,
                            warmup_steps=args.warmup_steps, vstep=vstep,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            seed=args.seed)
    teacher_logits = TeacherLogits(teacher, ids, output / "teacher_cache"
                                   if args.cache_teacher else None)
    record = {"source_checkpoint": str(source), "source_model": meta.get("source_model"),
              "finetune_config": _jsonable(config)}

    def save_best(model) -> None:
        save_compressed(model, tokenizer, output, record)

    result = finetune(student, teacher_logits, ids, config, windows,
                      checkpoint_dir=resume if args.checkpoint_every else None,
                      save_best=save_best if windows is not None else None)
    if windows is None:
        save_compressed(student, tokenizer, output, record)
    record["result"] = dataclasses.asdict(result)
    meta_path = output / "pvtune_meta.json"
    saved = json.loads(meta_path.read_text())
    saved["finetune_result"] = record["result"]
    meta_path.write_text(json.dumps(saved, indent=1, default=str))
    fb, dv = result.seconds_forward_backward, result.seconds_discrete
    rows = [["strategy", args.strategy], ["steps", len(result.losses)],
            ["KL first -> last", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
             if result.losses else "-"],
            ["discrete step time / forward+backward", f"{dv / fb:.1%}" if fb else "-"],
            ["checkpoint (best)", str(output)]]
    if result.evals:
        rows.append(["perplexity by step", ", ".join(f"{s}: {p:.2f}" for s, p in result.evals)])
        rows.append(["best perplexity", f"{result.best_perplexity:.3f} (step {result.best_step})"])
    print(format_table(["finetune", "value"], rows))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pvtune.llm.checkpoint import bits_report
    from pvtune.llm.data import EvalConfig, eval_windows, tokenize_stream
    from pvtune.llm.evaluate import generate
    from pvtune.llm.model import load_causal_lm
    from pvtune.report import format_table

    model, tokenizer = load_causal_lm(args.model)
    config = _eval_config(args, EvalConfig())
    windows = eval_windows(tokenize_stream(tokenizer, _load_texts(args.eval_text, "evaluation")),
                           config)
    result = _evaluate(model, tokenizer, windows, "model")
    bits = bits_report(model)
    sample = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    print(format_table(["metric", "value"], [
        ["perplexity", f"{result['perplexity']:.3f}"],
        ["tokens evaluated", result["tokens"]],
        ["tokens/s", f"{result['tokens_per_second']:.0f}"],
        ["bits/param (compressed linears)", f"{bits['linear_bits_per_param']:.3f}"],
        ["bits/param (whole model)", f"{bits['overall_bits_per_param']:.3f}"],
    ]))
    print(f"\nSample:\n  {args.prompt}{sample}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pvtune.llm.evaluate import generate
    from pvtune.llm.model import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        print(prompt + generate(model, tokenizer, prompt, args.max_new_tokens, chat=args.chat))
    return 0


# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from pvtune.llm.recipes import PRESETS

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
    p.add_argument("--method", choices=["aqlm", "gptq", "rtn"], default="aqlm")
    p.add_argument("--codebooks", default="2x8g8", help="AQLM layout MxBgG (default 2x8g8)")
    p.add_argument("--bits", type=int, default=2, help="bits per weight for gptq/rtn (2)")
    p.add_argument("--group-size", type=int, default=64,
                   help="group size for gptq/rtn (64; 0 = one group per row)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid for gptq/rtn")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--calib-text", help="calibration text (.txt or .jsonl); default: the "
                   "calibration split of the offline Wikipedia text")
    p.add_argument("--num-seqs", type=int, help="calibration sequences (preset)")
    p.add_argument("--seq-len", type=int, help="calibration sequence length (preset)")
    p.add_argument("--block-finetune-steps", type=int,
                   help="steps of block fine-tuning (preset; 0 disables)")
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    p.add_argument("--prompt", default=SAMPLE_PROMPT, help="prompt for the generation sample")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--output", help="checkpoint directory (default compressed-METHOD-...)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_compress)

    from pvtune.optim.strategies import STRATEGIES

    p = sub.add_parser("finetune", help="fine-tune a compressed checkpoint through its codes",
                       description="Global KL(teacher || student) distillation of a compressed "
                                   "model: Adam on continuous parameters, a discrete step on "
                                   "the codes (PV-Tuning or an STE variant).")
    p.add_argument("checkpoint", help="a pvtune checkpoint (from `pvtune compress`)")
    p.add_argument("--teacher", help="uncompressed model (default: the checkpoint's source)")
    p.add_argument("--strategy", choices=STRATEGIES.names(), default="subspace_v_ste")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4, help="continuous learning rate")
    p.add_argument("--schedule", choices=["constant", "cosine", "linear"], default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--code-lr", type=float, default=None,
                   help="discrete step size (default: the strategy's, 1e-2 for ste and "
                        "subspace_v_ste on uniform grids of at most 2 bits; see "
                        "benchmarks/results/finetune_code_lr.md)")
    p.add_argument("--tau", type=float, default=0.01, help="fraction of groups per V step")
    p.add_argument("--trust-ratio", type=float, default=None)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--calib-text")
    p.add_argument("--num-seqs", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: end)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write resume state every N steps (0: never)")
    p.add_argument("--cache-teacher", action="store_true",
                   help="cache the teacher's logits on disk (float16)")
    p.add_argument("--output", help="output checkpoint (default CHECKPOINT-finetuned-STRATEGY)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser("eval", help="perplexity, tokens/s and a sample of a model or checkpoint")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory "
                   "(default: the offline default model)")
    _add_eval_args(p)
    p.add_argument("--prompt", default=SAMPLE_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from prompts")
    p.add_argument("model", nargs="?", help="pvtune checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: stdin lines)")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.set_defaults(handler=_cmd_generate)

    p = sub.add_parser("reprs", help="compare every weight representation on a random layer")
    p.add_argument("--out-features", type=int, default=512)
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_reprs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvtune`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # Library errors carry user-facing messages; a traceback would only hide them.
        log.debug("error details", exc_info=True)
        print(f"pvtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
