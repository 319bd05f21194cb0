"""Question: what does the discrete (V) step cost next to one student forward+backward on
the same batch of SmolLM2-135M, at `pvtune finetune`'s default batch (2 x 256 tokens) and at
4 x 512 tokens?

Starts from the checkpoints benchmarks/compress_methods.py keeps in benchmarks/.work/.
Per batch, representation and strategy: one warm-up step, then the mean of 3 timed steps of
the student's forward+backward (next-token cross-entropy: the same cost as the KL loss
without the teacher) and of the V step. The V step's cost does not depend on the batch.

    python benchmarks/discrete_step_cost.py
    python benchmarks/discrete_step_cost.py --batches 2x256
    python benchmarks/discrete_step_cost.py --batches 2x256 --start q2_0=CHECKPOINT

``--start NAME=DIR`` measures other starting checkpoints (``subspace_v_ste`` and ``ste``);
rows of starts not measured again stay, marked carried over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work"
STARTS = {"aqlm-2x8g8": "compress-aqlm-2x8g8", "uniform-2bit-gptq": "compress-gptq-2"}
# dense STE re-encodes every group each step (for AQLM a search of every group's codes)
STRATEGIES = {"aqlm-2x8g8": ["subspace_v_ste", "subspace_v", "ste"],
              "uniform-2bit-gptq": ["subspace_v_ste", "subspace_v", "ste"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", default=["2x256", "4x512"],
                        help="sequences x tokens per batch")
    parser.add_argument("--start", nargs="+", metavar="NAME=DIR", default=None,
                        help="starting checkpoints to measure instead of compress_methods.py's")
    args = parser.parse_args()
    starts = {rep: WORK / d for rep, d in STARTS.items()}
    if args.start:
        starts = dict((name, Path(d)) for name, _, d in (s.partition("=") for s in args.start))
    import torch
    import torch.nn.functional as F
    from common import stamped, write_results

    from pvtune.llm.data import CalibrationConfig, calibration_batch, default_texts, tokenize_stream
    from pvtune.llm.model import load_causal_lm
    from pvtune.optim import PVOptimizer, VStepConfig, continuous_parameters

    rows = []
    for batch in args.batches:
        seqs, tokens = (int(v) for v in batch.split("x"))
        for rep, directory in starts.items():
            for strategy in STRATEGIES.get(rep, ["subspace_v_ste", "ste"]):
                model, tok = load_causal_lm(directory)
                ids = calibration_batch(
                    tokenize_stream(tok, default_texts("calibration")[:20]),
                    CalibrationConfig(num_sequences=seqs, sequence_length=tokens))
                opt = PVOptimizer(model, torch.optim.Adam(continuous_parameters(model),
                                                          lr=1e-5), VStepConfig(strategy=strategy))
                model.train()
                fb, vs = [], []
                for step in range(4):
                    t0 = time.perf_counter()
                    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                    ids[:, 1:].reshape(-1)).backward()
                    t1 = time.perf_counter()
                    stats = opt.step()
                    opt.zero_grad()
                    if step:  # the first step warms up allocations and state
                        fb.append(t1 - t0)
                        vs.append(stats.seconds_discrete)
                row = {"batch": batch, "representation": rep, "strategy": strategy,
                       "forward_backward_s": sum(fb) / len(fb),
                       "discrete_step_s": sum(vs) / len(vs)}
                row["ratio"] = row["discrete_step_s"] / row["forward_backward_s"]
                row = stamped(row)
                print(row, flush=True)
                rows.append(row)
    from common import RESULTS

    old = RESULTS / "discrete_step_cost.json"
    carry = [(r["batch"], r["representation"], r["strategy"]) for r in
             (json.loads(old.read_text())["rows"] if old.is_file() else [])]
    write_results("discrete_step_cost", __doc__.split("\n\n")[0].removeprefix("Question: "),
                  rows, ["batch", "representation", "strategy", "forward_backward_s",
                         "discrete_step_s", "ratio"], key=["batch", "representation", "strategy"],
                  carry=carry,
                  notes="batch: sequences x tokens; ratio = discrete step / forward+backward "
                        "of that batch; target for the PV strategies: at most 0.25.")


if __name__ == "__main__":
    main()
