"""Question: what is the default model's perplexity with and without a BOS token at the start
of every window, and which does pvtune's rule choose?

SmolLM2-135M-Instruct's GGUF says tokenizer.ggml.add_bos_token = false and pvtune follows it;
this records the reference model's figures both ways once, on the whole evaluation split
(512-token windows; the same tokens are scored either way, the BOS only adds context).

    python benchmarks/bos_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stamped, write_results  # noqa: E402


def main() -> None:
    from pvtune.llm.assets import default_model_dir
    from pvtune.llm.bos import BosChoice, decide_bos
    from pvtune.llm.data import EvalConfig, default_texts, eval_windows, tokenize_stream
    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.model import load_causal_lm

    model, tok = load_causal_lm(None)
    windows = eval_windows(tokenize_stream(tok, default_texts("evaluation")), EvalConfig())
    chosen = decide_bos(default_model_dir(), tok, model.config)
    token = tok.bos_token_id if tok.bos_token_id is not None else model.config.bos_token_id
    rows = []
    for add in (False, True):
        choice = BosChoice(add, token if add else None, "benchmark")
        result = perplexity(model, windows, bos=choice)
        rows.append(stamped({
            "model": "reference", "bos": "yes" if add else "no",
            "bos_token": tok.convert_ids_to_tokens(token) if add else "",
            "perplexity": result.perplexity, "tokens": result.tokens,
            "windows": result.windows, "pvtune_chooses": add == chosen.add,
        }))
        print(rows[-1], flush=True)
    write_results(
        "bos_reference", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["model", "bos", "bos_token", "perplexity", "tokens", "windows", "pvtune_chooses"],
        key=["model", "bos"],
        notes=f"reference: SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32. pvtune's "
              f"choice: {'BOS' if chosen.add else 'no BOS'} ({chosen.reason}).",
    )


if __name__ == "__main__":
    main()
