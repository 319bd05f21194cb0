"""Export a compressed model to GGUF, the file llama.cpp and Ollama run, and read one back.

Linear layers held in a GGUF block type (:mod:`pvtune.reprs.gguf_block`) are written byte
for byte as pvtune stores them; dense tensors are written in a type the caller picks
(embeddings and an untied head) or float32 (norms). The metadata (architecture, tokenizer,
special tokens, chat template) comes from the model's Hugging Face config and tokenizer.

Supported architectures: ``llama`` (Llama, SmolLM, Mistral-style models) and ``qwen2``.
llama.cpp's ``llama`` graph expects the rows of ``q_proj``/``k_proj`` in the interleaved
rotary order of the original checkpoints, so those rows are permuted on the way out (rows
only: blocks run along rows, so the bytes of each row are unchanged) and back on import.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pvtune.checkpoint.files import replace_durably, temporary_path, writing
from pvtune.errors import ConfigError, ModelError
from pvtune.export.gguf_file import read_gguf
from pvtune.llm.model import find_blocks
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.reprs.gguf_block import BLOCK_FORMATS, GGUFBlockConfig, GGUFBlockWeight

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3",
                 "gemma3_text": "gemma3"}
# architectures whose norms compute x * (1 + w): transformers keeps w, llama.cpp stores 1 + w
NORMS_PLUS_ONE = ("gemma3",)
GEMMA3_SWA_PATTERN = 6  # llama.cpp's Gemma-3: every 6th layer global, the others sliding
GEMMA3_LOCAL_ROPE_BASE = 10000.0
DENSE_TYPES = {"f32": 0, "f16": 1}
GGUF_VERSION_NOTE = "pvtune GGUF export"


@dataclass(frozen=True)
class GGUFExportConfig:
    """How dense tensors are written: ``embedding_type`` for the token embeddings and
    ``head_type`` for an untied output head (None: as the embeddings); each one of ``f32``,
    ``f16`` or a GGUF block type (``q8_0``, ``q4_0``, ``q4_1``, ``q2_0``, ``q1_0``,
    ``tq2_0``). Weights pvtune already holds in a GGUF block type are always written as they are.
    ``tokenizer_pre`` names llama.cpp's pre-tokenizer (None: the one recorded from the
    source GGUF, else ``gpt-2`` for plain byte-level BPE). ``dense_type``: the type of
    decoder linears pvtune did not compress (``f16``; ``f32`` for an exact reference file)."""

    embedding_type: str = "q8_0"
    head_type: str | None = None
    tokenizer_pre: str | None = None
    dense_type: str = "f16"

    def __post_init__(self) -> None:
        for name in ("embedding_type", "head_type", "dense_type"):
            value = getattr(self, name)
            if value is None and name == "head_type":
                continue
            if value not in DENSE_TYPES and value not in BLOCK_FORMATS:
                raise ConfigError(f"GGUFExportConfig.{name} must be one of "
                                  f"{sorted(DENSE_TYPES) + sorted(BLOCK_FORMATS)}, got {value!r}")


@dataclass
class GGUFExportReport:
    """What was written: the file, its bytes, and each tensor's GGUF type."""

    path: Path
    file_bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    linear_weights: int = 0
    linear_bytes: int = 0
    total_weights: int = 0

    @property
    def bits_per_param(self) -> float:
        """Whole file bits per model parameter (metadata included)."""
        return 8 * self.file_bytes / max(self.total_weights, 1)

    @property
    def linear_bits_per_param(self) -> float:
        """Bits per weight of the decoder's linear layers, from their tensor bytes."""
        return 8 * self.linear_bytes / max(self.linear_weights, 1)


def _type_name(ggml_type: int) -> str:
    for name, t in DENSE_TYPES.items():
        if t == ggml_type:
            return name
    for fmt in BLOCK_FORMATS.values():
        if fmt.ggml_type == ggml_type:
            return fmt.name
    return str(ggml_type)


def _architecture(config) -> str:
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ModelError(f"GGUF export supports model types {sorted(ARCHITECTURES)}; this model "
                         f"is {getattr(config, 'model_type', None)!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) \
        else [rope]
    if any(k.get("rope_type", "default") != "default" for k in kinds):
        raise ModelError(f"GGUF export does not write rotary scaling yet; this model uses {rope}")
    if arch == "gemma3":
        _check_gemma3(config)
    return arch


def _check_gemma3(config) -> None:
    """Refuse Gemma-3 settings that llama.cpp's Gemma-3 fixes otherwise (it would run the
    file, differently)."""
    head_dim = config.head_dim
    layers = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
               for i in range(layers)]
    local = ((config.rope_parameters or {}).get("sliding_attention") or {}).get("rope_theta")
    problems = []
    if config.query_pre_attn_scalar != head_dim:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
                        f"{head_dim}")
    if list(getattr(config, "layer_types", pattern)) != pattern:
        problems.append("layer types other than every 6th layer global")
    if local is not None and float(local) != GEMMA3_LOCAL_ROPE_BASE:
        problems.append(f"a sliding-attention rope base of {local}")
    if getattr(config, "final_logit_softcapping", None) or \
            getattr(config, "attn_logit_softcapping", None):
        problems.append("logit soft-capping")
    if problems:
        raise ModelError("GGUF export writes Gemma-3 models as llama.cpp runs them; this one "
                         f"has {', '.join(problems)}, which llama.cpp's Gemma-3 would ignore")


def _rope_theta(hf) -> float:
    """The rotary base of the global-attention layers."""
    rope = getattr(hf, "rope_parameters", None) or {}
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def rotary_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row ``r`` of the GGUF (interleaved rotary) tensor is row ``order[r]`` of the Hugging
    Face tensor; the inverse of transformers' GGUF loader's reverse permutation."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _row_order(arch: str, hf_name: str, rows: int, config) -> np.ndarray | None:
    if arch != "llama":
        return None
    if hf_name.endswith("q_proj"):
        return rotary_row_order(rows, config.num_attention_heads)
    if hf_name.endswith("k_proj"):
        return rotary_row_order(rows, config.num_key_value_heads)
    return None


def _dense_tensor(weight: torch.Tensor, type_name: str) -> tuple[np.ndarray, int]:
    """``(data, ggml_type)`` for a dense 2-D weight written as ``type_name``."""
    w = weight.detach().to(torch.float32)
    if type_name == "f32":
        return w.numpy(), 0
    if type_name == "f16":
        return w.to(torch.float16).numpy(), 1
    rep = GGUFBlockWeight.from_dense(w, GGUFBlockConfig(type_name))
    return rep.to_gguf_blocks(), rep.format.ggml_type


def _block_tensor(rep: GGUFBlockWeight) -> tuple[np.ndarray, int]:
    return rep.to_gguf_blocks(), rep.format.ggml_type


def _weight_tensor(module: nn.Module, type_name: str) -> tuple[np.ndarray, int, int]:
    """``(data, ggml_type, weights)`` of a linear or embedding: its GGUF blocks when
    pvtune holds it in a block type, else its dense weight written as ``type_name``."""
    if isinstance(module, QuantizedLinear) or hasattr(module, "qweight"):
        rep = module.qweight
        if not isinstance(rep, GGUFBlockWeight):
            raise ConfigError(
                f"GGUF export writes GGUF block types; a layer is stored as "
                f"{type(rep.config).__name__}. Compress into a GGUFBlockConfig type (q4_0, q8_0, "
                f"q4_1, q2_0, q1_0, tq2_0), or export AQLM models in the AQLM format")
        data, ggml_type = _block_tensor(rep)
        return data, ggml_type, rep.out_features * rep.in_features
    weight = module.weight
    data, ggml_type = _dense_tensor(weight, type_name)
    return data, ggml_type, weight.numel()


def _add_tensor(writer, name: str, data: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                report: GGUFExportReport) -> None:
    if ggml_type in (0, 1):
        writer.add_tensor(name, np.ascontiguousarray(data))
    else:  # raw blocks, given as int8 so the writer takes the logical shape as it is
        writer.add_tensor(name, np.ascontiguousarray(data).view(np.int8), raw_shape=shape,
                          raw_dtype=ggml_type)
    report.tensor_types[name] = _type_name(ggml_type)


def _tokenizer_metadata(writer, tokenizer, model_dir: Path | None, config,
                        pre: str | None, recorded: dict) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                       None)
    if backend is None:
        raise ModelError("GGUF export needs a fast (tokenizers) tokenizer")
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; "
                         f"this tokenizer is {model.get('type')!r}")
    vocab = {tok: i for tok, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    n_vocab = config.vocab_size
    tokens, types = [], []
    reverse = {i: t for t, i in vocab.items()}
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special")
                         else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # the embedding table is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    if pre is None:
        pre = recorded.get("tokenizer.ggml.pre")
    if pre is None:
        pre_tok = tok_json.get("pre_tokenizer") or {}
        pre = "gpt-2" if pre_tok.get("type") == "ByteLevel" else "default"
        if pre == "default":
            log.warning("llama.cpp's pre-tokenizer for this tokenizer is unknown; writing "
                        "'default' (text may tokenize differently; pass tokenizer_pre)")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    add_bos = recorded.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(recorded.get("tokenizer.ggml.add_eos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _write_metadata(writer, model: nn.Module, tokenizer, config: GGUFExportConfig, name: str,
                    recorded: dict, arch: str) -> None:
    """The key-value metadata llama.cpp reads: hyperparameters and tokenizer."""
    import gguf

    hf = model.config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = getattr(hf, "rope_parameters", None) or {}
    writer.add_name(name or getattr(hf, "_name_or_path", "") or "pvtune model")
    writer.add_vocab_size(hf.vocab_size)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(hf.num_attention_heads)
    writer.add_head_count_kv(hf.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(hf))
    writer.add_layer_norm_rms_eps(float(hf.rms_norm_eps))
    rotary = getattr(hf, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(head_dim * float(rotary)))
    if head_dim != hf.hidden_size // hf.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma3", "phi3") and getattr(hf, "sliding_window", None):
        writer.add_sliding_window(int(hf.sliding_window))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, tokenizer, None, hf, config.tokenizer_pre, recorded)


def gguf_metadata_bytes(model: nn.Module, tokenizer, recorded_gguf: dict | None = None,
                        config: GGUFExportConfig = GGUFExportConfig()) -> int:
    """Bytes of the header and key-value metadata :func:`export_gguf` writes for ``model``
    (tensor records and data excluded): what a size budget counts besides the tensors."""
    import tempfile

    import gguf

    arch = _architecture(model.config)
    quiet = logging.getLogger("gguf")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the writer announces every file it writes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(path, arch)
        _write_metadata(writer, model, tokenizer, config, "", recorded_gguf or {}, arch)
        writer.add_file_type(1)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
        finally:
            writer.close()
            quiet.setLevel(level)
        return path.stat().st_size


def export_gguf(model: nn.Module, tokenizer, output: str | Path,
                config: GGUFExportConfig = GGUFExportConfig(), *, name: str = "",
                recorded_gguf: dict | None = None) -> GGUFExportReport:
    """Write ``model`` (a Hugging Face causal LM, compressed by pvtune or not) and its
    tokenizer to the GGUF file ``output`` (atomically). ``recorded_gguf`` holds metadata
    recorded from the GGUF the model came from (its pre-tokenizer and BOS flag)."""
    import gguf

    hf = model.config
    arch = _architecture(hf)
    structure = find_blocks(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output)
    report = GGUFExportReport(output, 0)
    writer = gguf.GGUFWriter(tmp, arch)
    _write_metadata(writer, model, tokenizer, config, name, recorded_gguf or {}, arch)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.num_hidden_layers)
    type_counts: dict[int, int] = {}
    embed = model.get_input_embeddings()
    data, ggml_type, n = _weight_tensor(embed, config.embedding_type)
    _add_tensor(writer, "token_embd.weight", data, ggml_type, tuple(embed.weight.shape), report)
    report.total_weights += n
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    if not tied and head is not None:
        data, ggml_type, n = _weight_tensor(head, config.head_type or config.embedding_type)
        _add_tensor(writer, "output.weight", data, ggml_type, (head.out_features,
                                                              head.in_features), report)
        report.total_weights += n
    for full, param in model.named_parameters():  # norms and biases: float32
        if param.dim() != 1 or ".qweight." in full:
            continue
        module_name, _, kind = full.rpartition(".")
        gname = names.get_name(module_name)
        if gname is None:
            raise ModelError(f"no GGUF name for {full!r} in architecture {arch!r}")
        vec = param.detach().to(torch.float32).numpy()
        if arch in NORMS_PLUS_ONE and kind == "weight" and module_name.endswith("norm"):
            vec = vec + 1.0
        order = _row_order(arch, module_name, vec.shape[0], hf) if kind == "bias" else None
        _add_tensor(writer, f"{gname}.{kind}", vec if order is None else vec[order], 0,
                    vec.shape, report)
        report.total_weights += vec.size
    for i, block in enumerate(structure.blocks):
        for lname in structure.linear_names(i, include_quantized=True):
            module = block.get_submodule(lname)
            hf_name = f"{structure.path}.{i}.{lname}"
            gname = names.get_name(hf_name)
            if gname is None:
                raise ModelError(f"no GGUF name for layer {hf_name!r} in architecture {arch!r}")
            data, ggml_type, n = _weight_tensor(module, config.dense_type)
            order = _row_order(arch, hf_name, module.out_features, hf)
            if order is not None:
                data = data[order]
            _add_tensor(writer, f"{gname}.weight", data, ggml_type,
                        (module.out_features, module.in_features), report)
            report.total_weights += n
            report.linear_weights += n
            report.linear_bytes += data.nbytes
            type_counts[ggml_type] = type_counts.get(ggml_type, 0) + n
    main = max(type_counts, key=type_counts.get) if type_counts else 1
    writer.add_file_type(next((f.file_type for f in BLOCK_FORMATS.values()
                               if f.ggml_type == main), 1))
    try:  # a failed or interrupted write leaves no partial file behind
        with writing(output, "no file was written"):
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
            replace_durably(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    report.file_bytes = output.stat().st_size
    return report


def import_gguf_linears(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Replace ``model``'s decoder linear layers with the GGUF block tensors of ``path``
    (bit-exact codes and scales), and copy its float norms; the model must have the GGUF's
    architecture and shapes. Returns the file's metadata."""
    import gguf

    contents = read_gguf(path)
    hf = model.config
    arch = _architecture(hf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.num_hidden_layers)
    structure = find_blocks(model)
    by_type = {f.ggml_type: f for f in BLOCK_FORMATS.values()}
    for i, block in enumerate(structure.blocks):
        for lname in structure.linear_names(i, include_quantized=True):
            hf_name = f"{structure.path}.{i}.{lname}"
            tensor = contents.tensors.get(f"{names.get_name(hf_name)}.weight")
            module = block.get_submodule(lname)
            dense = tensor is not None and tensor.ggml_type in DENSE_TYPES.values()
            if tensor is None or not (dense or tensor.ggml_type in by_type):
                raise ModelError(f"{path}: layer {hf_name} is missing or neither F16, F32 nor "
                                 "a GGUF block type")
            out_f, in_f = tensor.shape
            if (out_f, in_f) != (module.out_features, module.in_features):
                raise ModelError(f"{path}: {hf_name} has shape {tensor.shape}, the model "
                                 f"{(module.out_features, module.in_features)}")
            data = np.asarray(tensor.data)
            if dense:  # raw bytes of float16 or float32 values
                data = data.view(np.float16 if tensor.ggml_type == DENSE_TYPES["f16"]
                                 else np.float32)
            data = data.reshape(out_f, -1)
            order = _row_order(arch, hf_name, out_f, hf)
            if order is not None:
                data = data[np.argsort(order)]
            bias = getattr(module, "bias", None)
            if dense:  # a layer kept uncompressed: a plain linear of the stored values
                linear = nn.Linear(in_f, out_f, bias=bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(torch.from_numpy(data.astype(np.float32)))
                    if bias is not None:
                        linear.bias.copy_(bias)
                set_submodule(block, lname, linear)
                continue
            rep = GGUFBlockWeight.from_gguf_blocks(data, out_f, in_f,
                                                   GGUFBlockConfig(by_type[tensor.ggml_type].name))
            set_submodule(block, lname, QuantizedLinear(rep, None if bias is None else bias))
    return contents.metadata

