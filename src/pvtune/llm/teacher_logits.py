"""The teacher's logits per calibration sequence, computed on the fly or cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from pvtune.checkpoint.files import remove_temporaries, save_tensors_atomic
from pvtune.llm.bos import BosChoice, model_logits

log = logging.getLogger(__name__)


class TeacherLogits:
    """The teacher's logits per calibration sequence: on the fly, or cached to disk in
    float16 (one safetensors file per sequence, written atomically on first use).

    A cache file is named by a digest of ``fingerprint`` (which must change with the
    teacher's weights), the BOS choice and the sequence's tokens, so a cache is never reused
    for another teacher or other text; a damaged file is recomputed.
    """

    def __init__(self, teacher: nn.Module, ids: Tensor, cache_dir: Path | None = None,
                 fingerprint: str = "", bos: BosChoice | None = None):
        self.teacher, self.ids, self.cache_dir, self.bos = teacher, ids, cache_dir, bos
        self._key = hashlib.sha256(
            (fingerprint + json.dumps(bos.to_dict() if bos else None)).encode()).digest()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            remove_temporaries(cache_dir)

    def _path(self, i: int) -> Path:
        digest = hashlib.sha256(self._key + self.ids[i].numpy().tobytes()).hexdigest()
        return self.cache_dir / f"{digest[:32]}.safetensors"

    def _compute(self, index: Tensor) -> Tensor:
        return model_logits(self.teacher, self.ids[index], self.bos)

    @torch.no_grad()
    def __call__(self, index: Tensor) -> Tensor:
        if self.cache_dir is None:
            return self._compute(index)
        rows = []
        for i in index.tolist():
            path = self._path(i)
            logits = None
            if path.is_file():
                try:
                    logits = load_file(str(path))["logits"].float()
                except (SafetensorError, OSError, KeyError) as err:
                    log.warning("teacher cache %s is damaged (%s); recomputing it", path, err)
            if logits is None or logits.shape[0] != self.ids.shape[1]:
                logits = self._compute(torch.tensor([i]))[0]
                save_tensors_atomic({"logits": logits.to(torch.float16).contiguous()}, path)
                logits = logits.to(torch.float16).float()  # what a cache hit would return
            rows.append(logits)
        return torch.stack(rows)
