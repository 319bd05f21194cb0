"""The size-quality frontier of GGUF files, as llama.cpp runs them: pvtune's budgeted files
(with and without rotation, before and after the demo's PV-Tuning steps) against llama.cpp's
own quantizations of the same reference.

Every point is a GGUF file scored by llama.cpp itself: perplexity on pvtune's evaluation
windows (16 windows of 512 tokens spread over the evaluation split, no BOS as the model's
GGUF says), greedy decode
tokens/s, and the fixed factual question set (:mod:`pvtune.llm.questions`) through the chat
template the file carries. The reference is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to
fp32, written as an F32 GGUF; llama.cpp's files are made from it by ``llama_model_quantize``.

pvtune's files follow ``make demo``'s recipe: GPTQ with the demo preset's calibration (16
sequences of 512 tokens of text and 16 of conversations the reference writes itself,
``--chat-data 16``) and ``--target-size`` budgets; the sensitivities are measured once per
rotation setting and shared by every budget (what ``pvtune compress --target-size`` measures
on each run); each checkpoint is then PV-tuned by ``pvtune finetune CKPT --steps 20
--eval-windows 16 --chat-data 32`` (the demo's command) and exported again.

llama.cpp's own files and the reference do not depend on pvtune's code: their rows are kept
from the commit that measured them (marked carried over) and not measured again. The number
of correct answers is recomputed from each row's stored answers with the current scorer.
A run that measures some of pvtune's points keeps the others' rows from the commit that
measured them, marked carried over.

    python benchmarks/frontier.py                          # everything, resumable
    python benchmarks/frontier.py --budgets 50,60 --no-pv  # a subset
    python benchmarks/frontier.py --budgets 70 --rotations off --single-types '' \
        --pv-steps 20,100                                   # a longer PV run at 70 MiB
    python benchmarks/frontier.py --budgets 70 --rotations off --single-types '' \
        --pv-steps 60 --pv-code-lr 0.01 --pv-eval-every 10  # other PV settings

Rows already in ``results/frontier.json`` at the current commit are skipped, so an
interrupted run continues where it stopped. Needs ``pip install -e '.[llamacpp]'``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, provenance, stamped, write_results  # noqa: E402

NAME = "frontier"
WORK = ROOT / "benchmarks" / ".work" / "frontier"
LLAMACPP_TYPES = {"Q2_0": 41, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q4_0": 2, "Q4_1": 3,
                  "IQ4_NL": 25, "Q4_K_M": 15, "Q5_K_M": 17, "Q8_0": 7}
BUDGETS_MIB = (60, 50, 70, 45, 80, 95)  # the order they run in
PV_STEPS = 20
SINGLE_TYPES = ("q2_0/q4_0", "q2_0/q8_0", "q4_0/q4_0", "q4_0/q8_0")  # linears/embeddings
WINDOWS = 16  # llama.cpp runs Q2_0 at about 70 tokens/s here: 16 windows take 2 minutes
FINETUNE_WINDOWS = 16  # the demo's keep-best evaluation (make demo: --eval-windows 16)
CHAT_SEQUENCES = 16  # compress --chat-data
FINETUNE_CHAT_SEQUENCES = 32  # finetune --chat-data
RECORDED = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False}
COLUMNS = ["point", "file_mib", "bits_per_param", "perplexity", "ratio", "correct",
           "answers_vs_reference", "decode_tok_s", "types", "seconds"]


def _windows(tokenizer):
    from pvtune.llm.data import EvalConfig, default_texts, eval_windows, tokenize_stream

    stream = tokenize_stream(tokenizer, default_texts("evaluation"))
    return eval_windows(stream, EvalConfig(window=512, max_windows=WINDOWS))


def measure(path: Path, windows, threads: int, params: int) -> dict:
    """llama.cpp's figures for the GGUF file ``path`` of a model of ``params`` parameters."""
    from pvtune.export.llamacpp import ask_llamacpp, llamacpp_decode_speed, llamacpp_perplexity
    from pvtune.llm.bos import BosChoice
    from pvtune.llm.questions import score

    ppl = llamacpp_perplexity(path, windows, BosChoice(False, None, "the GGUF says none"), threads,
                              progress=False)
    speed = llamacpp_decode_speed(path, windows[0][:64].tolist(), 64, threads)
    answers = score(ask_llamacpp(path, threads, max_new_tokens=32))
    size = path.stat().st_size
    return {"file_mib": size / 2**20, "bits_per_param": 8 * size / params,
            "perplexity": ppl.perplexity, "decode_tok_s": speed, "correct": answers.correct,
            "questions": len(answers.results), "answers": answers.to_dict()["answers"]}


def _is_llamacpp(point: str) -> bool:
    return point == "reference F32" or point.startswith("llama.cpp")


def _rows() -> list[dict]:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _done(commit: str) -> set[str]:
    return {r["point"] for r in _rows()
            if _is_llamacpp(r["point"]) or (r.get("provenance", {}).get("commit") == commit
                                            and not r.get("carried_over"))}


def derive(rows: list[dict]) -> None:
    """Answers rescored with the current scorer; ratios against the reference row."""
    from pvtune.llm.questions import QUESTIONS

    by_text = {q.text: q for q in QUESTIONS}
    for r in rows:
        answers = r.get("answers") or []
        for a in answers:
            a["correct"] = by_text[a["question"]].is_answered_by(a["answer"])
        if answers:
            r["correct"] = sum(a["correct"] for a in answers)
    ref = next((r for r in rows if r["point"] == "reference F32"), None)
    for r in rows:
        if ref is not None:
            r["ratio"] = r["perplexity"] / ref["perplexity"]
            r["answers_vs_reference"] = r["correct"] / max(ref["correct"], 1)


def record(row: dict, notes: str) -> None:
    carry = [(r["point"],) for r in _rows()]  # rows of other commits stay, marked carried over
    write_results(NAME, "Which GGUF file of each size answers best, as llama.cpp runs it?",
                  [stamped(row)], COLUMNS, key=["point"], notes=notes, derive=derive,
                  carry=carry)
    plot()


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((RESULTS / f"{NAME}.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {"llama.cpp": [r for r in rows
                                                   if r["point"].startswith("llama.cpp")]}
    for r in rows:
        if r["point"].startswith("pvtune"):
            kind = ("single type" if r.get("single_type") else
                    "rotated" if r.get("rotation") else "no rotation")
            steps = r.get("pv_steps", 0)
            groups.setdefault(f"pvtune {kind}, " + (f"+ {steps} PV steps" if steps else "GPTQ"),
                              []).append(r)
    for label, pts in groups.items():
        pts = sorted(pts, key=lambda r: r["file_mib"])
        if pts and "ratio" in pts[0]:
            ax.plot([r["file_mib"] for r in pts], [r["ratio"] for r in pts],
                    "o" if label == "llama.cpp" else "o-", label=label)
            if label == "llama.cpp":
                for r in pts:
                    ax.annotate(r["point"].split()[-1], (r["file_mib"], r["ratio"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlim(40, 145)
    ax.set_ylim(0.95, 20)
    ax.set_xlabel("GGUF file size (MiB)")
    ax.set_ylabel("llama.cpp perplexity / reference")
    ax.set_title("SmolLM2-135M-Instruct: size against quality in llama.cpp")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)
    plt.close(fig)


def _llamacpp_files(threads: int) -> dict[str, Path]:
    import llama_cpp

    from pvtune.export import GGUFExportConfig, export_gguf
    from pvtune.llm.model import load_causal_lm

    WORK.mkdir(parents=True, exist_ok=True)
    ref = WORK / "reference-f32.gguf"
    if not ref.is_file():
        model, tok = load_causal_lm(None)
        export_gguf(model, tok, ref, GGUFExportConfig(embedding_type="f32", dense_type="f32"),
                    name="SmolLM2-135M-Instruct reference", recorded_gguf=RECORDED)
    files = {"reference F32": ref}
    for name, ftype in LLAMACPP_TYPES.items():
        out = WORK / f"llamacpp-{name}.gguf"
        if not out.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            rc = llama_cpp.llama_model_quantize(str(ref).encode(), str(out).encode(),
                                                ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed ({rc})")
        files[f"llama.cpp {name}"] = out
    return files


def _finetuned_rows(args, windows, done: set[str], notes: str, ckpt: Path, point: str,
                    base_row: dict) -> None:
    """The PV-tuned rows of the checkpoint ``ckpt`` (one per ``--pv-steps`` count): the demo's
    ``pvtune finetune`` command at that many steps, exported again and measured."""
    from pvtune.export import export_gguf
    from pvtune.llm.checkpoint import load_compressed

    for steps in args.pv_steps:
        pv_point = _pv_point(point, steps, args)
        if pv_point in done:
            continue
        out = WORK / f"{ckpt.name}-pv{steps}" if args.pv_code_lr is None else \
            WORK / f"{ckpt.name}-pv{steps}-c{args.pv_code_lr:g}"
        t0 = time.perf_counter()
        cmd = [str(Path(sys.executable).with_name("pvtune")), "finetune", str(ckpt),
               "--steps", str(steps), "--eval-windows", str(FINETUNE_WINDOWS),
               "--chat-data", str(FINETUNE_CHAT_SEQUENCES), "--output", str(out),
               "--overwrite"]
        if args.pv_code_lr is not None:
            cmd += ["--code-lr", f"{args.pv_code_lr:g}"]
        if args.pv_eval_every is not None:
            cmd += ["--eval-every", str(args.pv_eval_every)]
        subprocess.run(cmd, check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        model, tok = load_compressed(out)
        gguf = out.with_suffix(".gguf")
        export_gguf(model, tok, gguf, name=pv_point, recorded_gguf=RECORDED)
        del model
        result = json.loads((out / "pvtune_meta.json").read_text()).get("finetune_result", {})
        row = {**base_row, "point": pv_point, "pv_steps": steps, "seconds": seconds,
               "pv_code_lr": args.pv_code_lr, "pv_eval_every": args.pv_eval_every,
               "finetune_evals": result.get("evals"), "best_step": result.get("best_step")}
        row.update(measure(gguf, windows, args.threads, args.params))
        record(row, notes)


def _pv_point(point: str, steps: int, args) -> str:
    """The name of ``point``'s row after ``steps`` PV steps, naming any setting that is not
    the demo's."""
    name = f"{point}, {steps} PV steps"
    if args.pv_code_lr is not None:
        name += f", code step {args.pv_code_lr:g}"
    if args.pv_eval_every is not None:
        name += f", evaluated every {args.pv_eval_every}"
    return name


def _checkpoint_record(rotation: dict | None) -> dict:
    """The record a frontier checkpoint of the default model is saved with (what ``pvtune
    finetune`` reads back: source, chat data, BOS, dense storage, rotation)."""
    from pvtune.llm.model import model_fingerprint
    from pvtune.llm.sources import DEFAULT_MODEL

    return {"source_model": DEFAULT_MODEL, "chat_data": {"sequences": CHAT_SEQUENCES},
            "source_fingerprint": model_fingerprint(None),
            "bos": {"add": False, "token_id": None, "reason": "GGUF"},
            "compress_config": {"dense_storage": "float16"}, "rotation": rotation}


def _compressed_point(args, windows, done: set[str], notes: str, point: str, ckpt: Path,
                      model, tok, calib, config, meta: dict, row: dict, **compress_kw) -> None:
    """Compress ``model`` by ``config`` into the checkpoint ``ckpt``, measure its GGUF file as
    the row ``point``, then its PV-tuned rows. A budget below the smallest file the setting
    can make gives no rows."""
    from pvtune.errors import ConfigError
    from pvtune.export import export_gguf
    from pvtune.llm.checkpoint import save_compressed
    from pvtune.llm.pipeline import compress_model

    if point not in done:
        t0 = time.perf_counter()
        try:
            report = compress_model(model, calib, config, **compress_kw)
        except ConfigError as err:
            print(f"{point}: not measured: {err}", file=sys.stderr)
            return
        row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - t0
        if report.plan is not None:
            meta = {**meta, "budget_plan": report.plan.to_dict()}
            row.update(types=report.plan.summary(),
                       embeddings=report.plan.types.get("embeddings"),
                       head=report.plan.types.get("head", "tied"))
        save_compressed(model, tok, ckpt, meta)
        gguf = ckpt.with_suffix(".gguf")
        export_gguf(model, tok, gguf, name=point, recorded_gguf=RECORDED)
        measured = {**row, "point": point, "pv_steps": 0}
        measured.update(measure(gguf, windows, args.threads, args.params))
        record(measured, notes)
    elif not ckpt.is_dir():
        return  # measured at this commit, but its checkpoint is gone: nothing to tune
    else:
        plan = json.loads((ckpt / "pvtune_meta.json").read_text()).get("budget_plan")
        if plan is not None:
            row.update(types=plan["counts"], embeddings=plan["types"].get("embeddings"),
                       head=plan["types"].get("head", "tied"))
    del model
    if args.pv:
        _finetuned_rows(args, windows, done, notes, ckpt, point, row)


def _single_type_points(args, windows, done: set[str], notes: str, source, tok, calib,
                        calibration) -> None:
    """pvtune's files with one block type for every decoder linear and one for the token
    embeddings (the tied head shares them): the points the budgeted files must beat."""
    from pvtune.init.gptq import GPTQConfig
    from pvtune.llm.pipeline import CompressConfig
    from pvtune.reprs import GGUFBlockConfig

    for linears, embeddings in args.single_types:
        point = f"pvtune {linears.upper()} linears, {embeddings.upper()} embeddings"
        wanted = [point] + ([_pv_point(point, s, args) for s in args.pv_steps]
                            if args.pv else [])
        if all(p in done for p in wanted):
            continue
        config = CompressConfig(method="gptq", representation=GGUFBlockConfig(linears),
                                method_config=GPTQConfig(), calibration=calibration,
                                embeddings=GGUFBlockConfig(embeddings))
        meta = _checkpoint_record(None)
        row = {"source": "pvtune", "single_type": True, "rotation": False,
               "types": f"{linears.upper()} linears, {embeddings.upper()} embeddings",
               "embeddings": embeddings.upper(), "head": "tied"}
        _compressed_point(args, windows, done, notes, point,
                          WORK / f"single-{linears}-{embeddings}", copy.deepcopy(source), tok,
                          calib, config, meta, row)


def _pvtune_points(args, windows, done: set[str], notes: str) -> None:
    import torch

    from pvtune.export.gguf import gguf_metadata_bytes
    from pvtune.init.gptq import GPTQConfig
    from pvtune.llm.assets import cache_dir
    from pvtune.llm.budget import BudgetConfig, measure_options
    from pvtune.llm.chat_data import ChatDataConfig, chat_sequences, interleave
    from pvtune.llm.data import (
        CalibrationConfig,
        calibration_batch,
        default_texts,
        tokenize_stream,
    )
    from pvtune.llm.model import load_causal_lm, model_fingerprint
    from pvtune.llm.pipeline import CompressConfig
    from pvtune.reprs import GGUFBlockConfig
    from pvtune.rotation import RotationConfig, rotate_model_

    source, tok = load_causal_lm(None)
    calibration = CalibrationConfig(num_sequences=16, sequence_length=512)
    calib = calibration_batch(tokenize_stream(tok, default_texts("calibration")), calibration)
    chat = chat_sequences(source, tok, ChatDataConfig(seed=0), CHAT_SEQUENCES, 512,
                          model_fingerprint(None), cache_dir() / "chat_data")
    calib = interleave(calib, chat)
    for rotated in args.rotations:
        label = "rotated" if rotated else "no rotation"
        wanted = [b for b in args.budgets
                  if f"pvtune {b} MiB, {label}" not in done
                  or (args.pv and any(_pv_point(f"pvtune {b} MiB, {label}", s, args)
                                      not in done for s in args.pv_steps))]
        if not wanted:
            continue
        torch.manual_seed(0)
        base = copy.deepcopy(source)
        rotation = rotate_model_(base, RotationConfig()).to_dict() if rotated else None
        metadata = gguf_metadata_bytes(base, tok, RECORDED)
        t0 = time.perf_counter()
        options = measure_options(base, calib, BudgetConfig(target_bytes=1))
        measure_seconds = time.perf_counter() - t0
        for budget in wanted:
            config = CompressConfig(method="gptq", representation=GGUFBlockConfig("q4_0"),
                                    method_config=GPTQConfig(), calibration=calibration,
                                    budget=BudgetConfig(target_bytes=budget * 2**20))
            meta = _checkpoint_record(rotation)
            row = {"source": "pvtune", "budget_mib": budget, "rotation": rotated,
                   "seconds": measure_seconds}
            _compressed_point(args, windows, done, notes, f"pvtune {budget} MiB, {label}",
                              WORK / f"b{budget}-{'rot' if rotated else 'plain'}",
                              copy.deepcopy(base), tok, calib, config, meta, row,
                              metadata_bytes=metadata, sensitivities=options)
    if args.single_types:
        _single_type_points(args, windows, done, notes, source, tok, calib, calibration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS_MIB)),
                        help="pvtune budgets in MiB, comma-separated")
    parser.add_argument("--rotations", default="off,on", help="off, on or off,on")
    parser.add_argument("--pv-steps", default=str(PV_STEPS),
                        help="PV-Tuning step counts, comma-separated: a row for each")
    parser.add_argument("--single-types", default=",".join(SINGLE_TYPES),
                        help="single-type files as LINEARS/EMBEDDINGS block types, "
                             "comma-separated ('' for none)")
    parser.add_argument("--pv-code-lr", type=float, default=None,
                        help="finetune --code-lr for the PV rows (default: the strategy's)")
    parser.add_argument("--pv-eval-every", type=int, default=None,
                        help="finetune --eval-every for the PV rows (default: start and end)")
    parser.add_argument("--no-pv", dest="pv", action="store_false",
                        help="skip the PV-Tuning points")
    parser.add_argument("--no-llamacpp", dest="llamacpp", action="store_false",
                        help="skip llama.cpp's own files (the reference is always measured)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",") if b]
    args.rotations = [r == "on" for r in args.rotations.split(",") if r]
    args.pv_steps = [int(s) for s in args.pv_steps.split(",") if s]
    args.single_types = [tuple(t.lower().split("/")) for t in args.single_types.split(",") if t]
    from pvtune.llm.finetune import FinetuneConfig
    from pvtune.llm.model import count_params, load_causal_lm

    model, tok = load_causal_lm(None)
    args.params = count_params(model)  # tied embeddings counted once
    del model
    windows = _windows(tok)
    notes = (f"SmolLM2-135M-Instruct; reference = its Q4_1 GGUF dequantized to fp32 (so Q4_1 "
             f"blocks of 32 hold the reference weights exactly). Perplexity, decode speed "
             f"and answers by llama.cpp (llama-cpp-python), {args.threads} threads, on "
             f"{WINDOWS} evaluation windows of 512 tokens; questions: "
             "pvtune.llm.questions (greedy, chat template, 32 new tokens). pvtune: GPTQ "
             f"(16 x 512 text + {CHAT_SEQUENCES} x 512 chat-data calibration tokens) with "
             "--target-size budgets, and single-type files (one block type for every decoder "
             "linear, one for the embeddings); PV: the demo's `pvtune finetune "
             f"--steps {PV_STEPS} --eval-windows {FINETUNE_WINDOWS} --chat-data "
             f"{FINETUNE_CHAT_SEQUENCES}` (continuous learning rate {FinetuneConfig.lr:g}, "
             "the default), and at the other step counts a row's name gives. llama.cpp's "
             "own files: carried over from the commit "
             "that measured them. A budget below the smallest file a setting can make (the "
             "rotated model's head is untied: 45 MiB) has no row.")
    done = _done(provenance()["commit"])
    files = _llamacpp_files(args.threads)
    for point, path in files.items():
        if point in done or (not args.llamacpp and point != "reference F32"):
            continue
        row = {"point": point, "source": "llama.cpp" if point != "reference F32" else
               "reference", "seconds": 0.0, "types": point.split()[-1]}
        row.update(measure(path, windows, args.threads, args.params))
        record(row, notes)
    _pvtune_points(args, windows, done, notes)


if __name__ == "__main__":
    main()
