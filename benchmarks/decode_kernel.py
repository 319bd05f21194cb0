"""Question: when is pvtune's lookup-table kernel faster than decoding an AQLM 2x8g8 weight
and multiplying densely, for SmolLM2-135M decoding 1 to 6 tokens per step (a batch of
sequences), on this machine's 2 threads? This sets ``LUT_MAX_TOKENS``.

Both paths run in one process on the same model (SmolLM2 with every decoder linear in AQLM
2x8g8; the codes' values do not change the speed). The dense path decodes each weight once
and keeps it (what pvtune does under no-grad), so it costs the memory of the fp32 model; the
kernel keeps only the codes. Steps alternate between the two paths, 3 rounds of 16 decoding
steps each after a 32-token prompt; the medians are reported.

    python benchmarks/decode_kernel.py [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stamped, write_results  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / ".work" / "deploy" / "aqlm-random-codes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT),
                        help="an AQLM 2x8g8 pvtune checkpoint of SmolLM2 (default: the random-"
                             "code one benchmarks/deploy.py makes)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    args = parser.parse_args()
    import torch

    import pvtune.nn.quantized_linear as ql
    from pvtune.llm.checkpoint import load_compressed

    model, _ = load_compressed(args.checkpoint)
    model.eval()

    def steps_per_s(batch: int, n: int = 16) -> float:
        ids = torch.randint(0, 40000, (batch, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return n / (time.perf_counter() - t0)

    saved = ql.LUT_MAX_TOKENS
    ql.LUT_MAX_TOKENS = 64
    steps_per_s(1, 2)  # compile the kernel, fill caches
    ql.LUT_MAX_TOKENS = 0
    steps_per_s(1, 2)
    rows = []
    for batch in args.batches:
        lut, dense = [], []
        for _ in range(3):
            ql.LUT_MAX_TOKENS = 64
            lut.append(steps_per_s(batch))
            ql.LUT_MAX_TOKENS = 0
            dense.append(steps_per_s(batch))
        row = {"tokens_per_step": batch, "lut_tok_s": batch * statistics.median(lut),
               "dense_tok_s": batch * statistics.median(dense)}
        row["lut_vs_dense"] = row["lut_tok_s"] / row["dense_tok_s"]
        rows.append(stamped(row))
        print(rows[-1], flush=True)
    ql.LUT_MAX_TOKENS = saved
    write_results("decode_kernel", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
                  ["tokens_per_step", "lut_tok_s", "dense_tok_s", "lut_vs_dense"],
                  key=["tokens_per_step"],
                  notes="tokens/s = tokens per step x steps/s (median of 3 rounds of 16 steps); "
                        "both paths in one process, alternating. Model: "
                        f"{Path(args.checkpoint).name}.")


if __name__ == "__main__":
    main()
