"""The AQLM checkpoint format, which transformers (``AqlmConfig``) and vLLM load: export a
pvtune AQLM model to it and import one back.

A Hugging Face folder whose ``config.json`` carries ``quantization_config`` with
``quant_method: "aqlm"``, and whose weights hold, for each compressed linear layer,
``codes [out, in/g, M]`` (int8 for 8-bit codebooks, stored signed: code ``c`` is written as
``c - 256`` when ``c >= 128``), ``codebooks [M, 2^B, 1, g]`` and ``scales [out, 1, 1, 1]``
(fp16). Layers left dense are listed in ``linear_weights_not_to_quantize`` by module name
(what transformers 5 matches) and by weight name (what older readers match).

transformers 5 no longer loads AQLM models in float32 on the CPU by itself, while the
``aqlm`` package's CPU kernel needs float32: pass ``dtype=torch.float32`` to
``from_pretrained``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pvtune.checkpoint.files import TMP_MARK, replace_durably, writing
from pvtune.errors import CheckpointError, ConfigError
from pvtune.nn.quantize import quantized_layers
from pvtune.nn.quantized_embedding import QuantizedEmbedding
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.reprs.codebook import AdditiveWeight, AQLMConfig

WEIGHTS_FILE = "model.safetensors"


@dataclass
class AQLMExportReport:
    """What :func:`export_aqlm` wrote."""

    directory: Path
    weights_bytes: int
    layers: int
    not_quantized: list[str]
    decoded_embeddings: bool


def to_signed_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """pvtune's unsigned codes -> AQLM's signed integers of ``bits`` bits."""
    wide = codes.to(torch.int64)
    wide = torch.where(wide >= 1 << (bits - 1), wide - (1 << bits), wide)
    return wide.to(torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32)


def from_signed_codes(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_signed_codes` into pvtune's code dtype."""
    return (codes.to(torch.int64) % (1 << bits)).to(dtype)


def _aqlm_config(layers: dict[str, QuantizedLinear]) -> AQLMConfig:
    configs = {(c.num_codebooks, c.nbits_per_codebook, c.in_group_size)
               for c in (m.qweight.config for m in layers.values())}
    if len(configs) != 1:
        raise ConfigError(f"the AQLM format has one codebook layout per model; this model has "
                          f"{sorted(configs)}")
    return next(iter(layers.values())).qweight.config


def export_aqlm(model: nn.Module, tokenizer, output: str | Path,
                dtype: torch.dtype = torch.float16) -> AQLMExportReport:
    """Write ``model`` (its decoder linears in pvtune's AQLM representation) as an AQLM
    Hugging Face folder ``output``; compressed embeddings are decoded to ``dtype`` (the
    format has no place for them)."""
    from safetensors.torch import save_file

    layers = {n: m for n, m in quantized_layers(model).items()
              if isinstance(m.qweight, AdditiveWeight) and not isinstance(m, QuantizedEmbedding)}
    if not layers:
        raise ConfigError("the AQLM format needs layers in pvtune's AQLM representation; "
                          "compress with the AQLM initialiser (method 'aqlm')")
    cfg = _aqlm_config(layers)
    decoded_embeddings = False
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, tensor in model.state_dict().items():
        if ".qweight." in key or tensor.data_ptr() in seen:  # codes below; tied weights once
            continue
        seen[tensor.data_ptr()] = key
        state[key] = tensor.detach().to(dtype).contiguous() if tensor.is_floating_point() \
            else tensor.contiguous()
    not_quantized = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding) or (
                isinstance(module, QuantizedLinear) and name not in layers):
            decoded_embeddings = decoded_embeddings or isinstance(module, QuantizedEmbedding)
            with torch.no_grad():
                state[f"{name}.weight"] = module.qweight().detach().to(dtype).contiguous()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to(dtype)
        if isinstance(module, nn.Linear | QuantizedLinear) and name not in layers \
                and not isinstance(module, QuantizedEmbedding):
            not_quantized.append(name)
    for name, layer in layers.items():
        rep = layer.qweight
        with torch.no_grad():
            state[f"{name}.codes"] = to_signed_codes(rep.codes, cfg.nbits_per_codebook)
            state[f"{name}.codebooks"] = rep.codebooks.detach().to(dtype).contiguous()
            state[f"{name}.scales"] = rep.scales.detach().to(dtype).contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        if head_name is not None:
            state.pop(f"{head_name}.weight", None)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": cfg.in_group_size,
        "out_group_size": 1,
        "num_codebooks": cfg.num_codebooks,
        "nbits_per_codebook": cfg.nbits_per_codebook,
        "linear_weights_not_to_quantize": sorted(
            not_quantized + [f"{n}.weight" for n in not_quantized]),
    }
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    with writing(output, "the folder's earlier files are unchanged"), \
            tempfile.TemporaryDirectory(dir=output, prefix=f".aqlm{TMP_MARK}-") as tmp:
        tmp = Path(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        for path in tmp.iterdir():
            if path.is_file():
                replace_durably(path, output / path.name)
    return AQLMExportReport(output, (output / WEIGHTS_FILE).stat().st_size, len(layers),
                            not_quantized, decoded_embeddings)


def import_aqlm(directory: str | Path):
    """``(model, tokenizer)`` from an AQLM Hugging Face folder, its compressed layers as
    pvtune :class:`AdditiveWeight` (codes bit-exact), ready to fine-tune or save."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pvtune.llm.tokenizer import load_tokenizer

    directory = Path(directory)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}/config.json is missing or unreadable: {err}") from None
    q = raw.get("quantization_config") or {}
    if q.get("quant_method") != "aqlm":
        raise CheckpointError(f"{directory} is not an AQLM model (quantization_config."
                              f"quant_method is {q.get('quant_method')!r})")
    if q.get("out_group_size", 1) != 1:
        raise CheckpointError("pvtune's AQLM representation has out_group_size 1; this model "
                              f"uses {q['out_group_size']}")
    cfg = AQLMConfig(num_codebooks=q["num_codebooks"], nbits_per_codebook=q["nbits_per_codebook"],
                     in_group_size=q["in_group_size"])
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(directory / WEIGHTS_FILE)
    for key in [k for k in state if k.endswith(".codes")]:
        name = key.removesuffix(".codes")
        linear = model.get_submodule(name)
        rep = AdditiveWeight(linear.out_features, linear.in_features, cfg)
        with torch.no_grad():
            rep.codes.copy_(from_signed_codes(state.pop(key), cfg.nbits_per_codebook,
                                              rep.codes.dtype))
            rep.codebooks.copy_(state.pop(f"{name}.codebooks").float())
            rep.scales.copy_(state.pop(f"{name}.scales").float())
        bias = state.get(f"{name}.bias")  # loaded with the rest below
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                QuantizedLinear(rep, None if bias is None else torch.zeros(bias.shape)))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    missing = [k for k in missing if ".qweight." not in k]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, load_tokenizer(directory)
