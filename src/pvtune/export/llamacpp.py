"""Running an exported GGUF file in llama.cpp (through ``llama-cpp-python``): perplexity on
pvtune's evaluation windows, and decoding speed, as llama.cpp itself computes them.

``llama-cpp-python`` is an optional dependency (``pip install 'pvtune[llamacpp]'``; it
compiles llama.cpp with the machine's C++ compiler, about 15 minutes on 2 cores).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pvtune.errors import AssetError
from pvtune.llm.bos import BosChoice
from pvtune.llm.evaluate import PerplexityResult

INSTALL_HINT = ("llama.cpp's Python binding is not installed: pip install 'pvtune[llamacpp]' "
                "(builds llama.cpp from source with the machine's gcc and cmake)")


def load_llamacpp(path: str | Path, n_ctx: int, threads: int | None = None, all_logits=True):
    """A ``llama_cpp.Llama`` for the GGUF file ``path`` (a clear error when the binding is
    missing or llama.cpp refuses the file)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise AssetError(INSTALL_HINT) from None
    try:
        return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                     logits_all=all_logits, verbose=False,
                     n_threads=threads or os.cpu_count() or 1)
    except ValueError as err:
        raise AssetError(f"llama.cpp could not load {path}: {err}") from None


def llamacpp_perplexity(path: str | Path, windows: Tensor, bos: BosChoice | None,
                        threads: int | None = None, progress: bool = True) -> PerplexityResult:
    """``exp(mean NLL)`` of each window's tokens 2..L given their prefixes, computed from
    llama.cpp's logits: the same tokens and the same definition as
    :func:`pvtune.llm.evaluate.perplexity`."""
    add = bos is not None and bos.add
    n_ctx = windows.shape[1] + int(add)
    llm = load_llamacpp(path, n_ctx, threads)
    nll, count, seconds = 0.0, 0, 0.0
    for row in tqdm(windows, desc="perplexity (llama.cpp)", disable=not progress, leave=False):
        ids = ([bos.token_id] if add else []) + row.tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        seconds += time.perf_counter() - t0
        logits = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
        logits = logits[int(add):-1]
        nll += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    mean = nll / count
    value = math.exp(mean) if mean < 709 else math.inf
    return PerplexityResult(value, count, windows.shape[0], seconds)


def ask_llamacpp(path: str | Path, threads: int | None = None, max_new_tokens: int = 40,
                 n_ctx: int = 512):
    """An ``answer_fn`` for :func:`pvtune.llm.questions.score`: greedy answers from the GGUF
    file ``path`` as llama.cpp runs it, through the chat template the file carries."""
    llm = load_llamacpp(path, n_ctx, threads, all_logits=False)

    def answer(question: str) -> str:
        llm.reset()
        out = llm.create_chat_completion([{"role": "user", "content": question}],
                                         temperature=0.0, top_k=1, max_tokens=max_new_tokens,
                                         seed=0)
        return out["choices"][0]["message"]["content"] or ""

    return answer


def llamacpp_decode_speed(path: str | Path, prompt_ids: list[int], new_tokens: int = 64,
                          threads: int | None = None) -> float:
    """Tokens per second llama.cpp decodes from the GGUF file ``path`` after ``prompt_ids``
    (greedy, one token at a time, the prompt's prefill not counted)."""
    llm = load_llamacpp(path, len(prompt_ids) + new_tokens + 8, threads, all_logits=False)
    llm.reset()
    llm.eval(prompt_ids)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return new_tokens / (time.perf_counter() - start)


# llama.cpp's perplexity may differ from pvtune's by its own arithmetic (float16 activations,
# its matmul kernels); beyond this relative gap, an export is suspect
VERIFY_TOLERANCE = 0.03


@dataclass(frozen=True)
class Verification:
    """pvtune's perplexity of a model next to llama.cpp's of its exported file."""

    pvtune: float
    llamacpp: float
    tolerance: float = VERIFY_TOLERANCE

    @property
    def ratio(self) -> float:
        """llama.cpp's perplexity over pvtune's."""
        return self.llamacpp / self.pvtune

    @property
    def agrees(self) -> bool:
        """Whether the two agree within :attr:`tolerance` (relative)."""
        return abs(self.ratio - 1) <= self.tolerance
