"""Loading causal language models and finding their decoder blocks generically.

pvtune needs no per-architecture table: the decoder blocks are the largest ``nn.ModuleList``
whose entries share one class and contain ``nn.Linear`` layers; the linears inside a block
are found by walking it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pvtune.errors import DataError, ModelError
from pvtune.llm.tokenizer import load_tokenizer, transformers_load_errors
from pvtune.nn.quantized_linear import QuantizedLinear

log = logging.getLogger(__name__)


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class BlockStructure:
    """Where the decoder blocks live: ``model.get_submodule(path)[i]`` is block ``i``."""

    path: str
    blocks: nn.ModuleList

    def linear_names(self, index: int, include_quantized: bool = False) -> list[str]:
        """Names (relative to block ``index``) of its ``nn.Linear`` layers (and its
        ``QuantizedLinear`` layers with ``include_quantized``)."""
        kinds = (nn.Linear, QuantizedLinear) if include_quantized else nn.Linear
        return [n for n, m in self.blocks[index].named_modules() if isinstance(m, kinds)]


def find_blocks(model: nn.Module) -> BlockStructure:
    """The decoder blocks of ``model`` (see the module docstring for the rule)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear | QuantizedLinear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise ModelError(
            f"{type(model).__name__} has no stack of repeated blocks built from nn.Linear, so "
            "pvtune cannot compress it. Supported: decoder-only causal LMs whose blocks use "
            "nn.Linear (Llama, Mistral, Qwen2, Phi-3, Gemma families). Module types found: "
            + ", ".join(kinds)
        )
    return BlockStructure(best[1], best[2])


def is_pvtune_checkpoint(path: Path) -> bool:
    """True when ``path`` holds (or held, before an interrupted save) a pvtune checkpoint."""
    from pvtune.checkpoint.format import LAYOUT_FILE, WEIGHTS_PREFIX

    path = Path(path)
    return (path / LAYOUT_FILE).is_file() or (
        path.is_dir() and any(path.glob(f"{WEIGHTS_PREFIX}*.safetensors")))


def looks_local(source: str | Path) -> bool:
    """Whether ``source`` names a local path rather than a model-hub id (``org/name``).

    Local: it exists, starts with ``.``, ``/`` or ``~``, has other than exactly one ``/``, or
    its first component is an existing folder (``models/smol`` with a ``models/`` here is a
    mistyped local path, not a hub id, and must not wait on the network).
    """
    text = str(source)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) \
            or text.count("/") != 1:
        return True
    return Path(text.split("/")[0]).is_dir()


def load_causal_lm(source: str | Path | None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local Hugging Face directory, a pvtune compressed
    checkpoint, a GGUF file (dequantized once, see
    :func:`~pvtune.llm.assets.prepared_gguf_dir`), or (``None``) the offline default
    SmolLM2-135M-Instruct.

    A string that is not a local path (see :func:`looks_local`) is passed to transformers as
    a hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if source is None:
        from pvtune.llm.assets import default_model_dir

        source = default_model_dir()
    path = Path(source).expanduser()
    local = looks_local(source)
    if local:
        if not path.exists():
            raise ModelError(
                f"model directory {str(source)!r} does not exist. Pass a local Hugging Face "
                "model directory (config.json + safetensors), a pvtune checkpoint, or nothing "
                "for the offline default model"
            )
        if path.is_file() and path.suffix.lower() == ".gguf":
            from pvtune.llm.assets import prepared_gguf_dir

            path = prepared_gguf_dir(path)
        if not path.is_dir():
            raise ModelError(f"{path} is a file, not a model: give a model directory "
                             "(config.json + safetensors), a pvtune checkpoint or a .gguf file")
        if is_pvtune_checkpoint(path):
            from pvtune.llm.checkpoint import load_compressed

            return load_compressed(path)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        source = path
    try:
        config = AutoConfig.from_pretrained(source)
    except transformers_load_errors() as err:
        where = "" if local else " (not a local folder, so it was looked up on the model hub)"
        raise ModelError(f"cannot read the model config of {source}{where}: {err}") from None
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
        architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures)
    ):
        kind = ", ".join(architectures) or "encoder-decoder"
        raise ModelError(
            f"{source} is a {config.model_type!r} model ({kind}), not a causal language model; "
            "pvtune compresses decoder-only causal LMs"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except transformers_load_errors() as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(
                f"{source} is a {config.model_type!r} model, not a causal language model; "
                "pvtune compresses decoder-only causal LMs"
            ) from None
        raise ModelError(f"cannot load the model at {source}: {err}") from None
    tokenizer = load_tokenizer(source)
    model.eval()
    find_blocks(model)  # fail early with a clear message on unsupported architectures
    return model, tokenizer


def model_fingerprint(source: str | Path | None) -> str:
    """A digest that changes when a model's files change: a pvtune checkpoint's layout
    checksum, a prepared model's manifest, or else ``config.json`` with the names, sizes and
    modification times of the weight files. A hub id is its own fingerprint."""
    if source is None:
        from pvtune.llm.assets import default_model_dir

        source = default_model_dir()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from pvtune.llm.assets import prepared_gguf_dir

        path = prepared_gguf_dir(path)
    if not path.is_dir():
        return f"hub:{source}"
    digest = hashlib.sha256(str(path.resolve()).encode())
    layout, manifest = path / "pvtune_layout.json", path / "manifest.json"
    for marker in (layout, manifest, path / "config.json"):
        if marker.is_file():
            digest.update(marker.read_bytes())
    if not layout.is_file() and not manifest.is_file():
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def count_params(model: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` was built for (its config's position limit), or None
    when the config does not say."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_generation_length(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """A :class:`~pvtune.errors.DataError` when a prompt of ``prompt_tokens`` plus
    ``max_new_tokens`` new tokens would run past the model's context window."""
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = max(limit - prompt_tokens, 0)
        raise DataError(f"{max_new_tokens} new tokens after a {prompt_tokens}-token prompt run "
                        f"past this model's context window of {limit} tokens; ask for at most "
                        f"{room} new tokens")
