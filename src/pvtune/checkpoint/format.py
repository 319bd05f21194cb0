"""Saving and loading quantized models: one safetensors file plus a JSON layout.

Integer codes are bit-packed with each representation's codecs; continuous tensors are
stored as float16 when that is exact and in their own dtype otherwise, so a loaded model
reproduces the saved one's outputs bit for bit, and the bits per parameter a checkpoint
reports are computed from the bytes it stores. No pickle anywhere.

A save is crash-safe. The tensors go to a new file named by its content
(``pvtune_model-<sha256 prefix>.safetensors``); the layout, written last and atomically,
names that file with its SHA-256 and is the commit point; older tensor files are removed
after it. A process killed at any moment leaves the previous checkpoint loadable or, for a
first save, a directory that loading reports as incomplete. Loading verifies the tensor
file's checksum, the layout's own checksum, that the packed codes match what the layout's
representations need, and that every continuous value is finite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from pvtune.checkpoint.files import (
    remove_temporaries,
    save_tensors_by_content,
    sha256_file,
    write_json_atomic,
)
from pvtune.errors import CheckpointError
from pvtune.nn.attached import attached_specs, install_attached_
from pvtune.nn.input_quantized_linear import InputQuantizedLinear
from pvtune.nn.input_quantizers import input_quantizer_from_spec, input_quantizer_spec
from pvtune.nn.quantize import quantized_layers
from pvtune.nn.quantized_embedding import QuantizedEmbedding, shared_layers
from pvtune.nn.quantized_linear import LAYER_KINDS, QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.nn.token_quant import TokenQuantizer
from pvtune.packing import codec_from_dict
from pvtune.qat.layers import ActivationQuantizer

log = logging.getLogger(__name__)

FORMAT_NAME = "pvtune-quantized"
FORMAT_VERSION = 2
LAYOUT_FILE = "pvtune_layout.json"
WEIGHTS_PREFIX = "pvtune_model"
LEGACY_WEIGHTS_FILE = "pvtune_model.safetensors"  # format version 1: fixed name, no checksum
# what a checkpoint can hold besides compressed layers (importing them registers their
# kinds): input quantizers of compressed layers, and full-precision linears behind one
BUILTIN_KINDS = (ActivationQuantizer, TokenQuantizer, InputQuantizedLinear)
CODE_DTYPES = ("uint8", "int8", "int16", "int32", "int64")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _exact_fp16(t: Tensor) -> bool:
    if not t.is_floating_point() or t.dtype == torch.float16:
        return False
    if not torch.isfinite(t).all():
        return False
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def pack_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON layout :func:`save_quantized` writes (exposed for testing)."""
    layout: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": {},
                              "packed": {}, "dtypes": {}, "aliases": {}}
    state = _dedupe_shared(model.state_dict(), layout)
    layers = quantized_layers(model)
    shared = shared_layers(layers)
    for name, layer in layers.items():
        spec = {
            "config": layer.qweight.config.to_dict(),
            "out_features": layer.out_features,
            "in_features": layer.in_features,
            "bias": layer.bias is not None,
        }
        if layer.layout_kind != "linear":  # a plain linear's entry names no kind
            spec["kind"] = layer.layout_kind
        spec.update(layer.layout_spec())
        if layer.input_quantizer is not None:
            spec["activations"] = input_quantizer_spec(layer.input_quantizer)
        layout["layers"][name] = spec
        if name in shared:  # a tied head: its codes are the embeddings' (an alias)
            spec["shares"] = shared[name]
            continue
        for buf, codec in layer.qweight.integer_codecs().items():
            key = f"{name}.qweight.{buf}"
            codes = state[key]
            state[key] = codec.pack(codes)
            layout["packed"][key] = {**codec.to_dict(), "shape": list(codes.shape),
                                     "dtype": str(codes.dtype).removeprefix("torch.")}
    attached = attached_specs(model)
    if attached:  # recorded only where present: other layouts stay as they were
        layout["attached"] = attached
    for key, tensor in list(state.items()):
        if key not in layout["packed"] and _exact_fp16(tensor):
            layout["dtypes"][key] = str(tensor.dtype).removeprefix("torch.")
            state[key] = tensor.to(torch.float16)
    return state, layout


def storage_report(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Any]:
    """Bits per parameter from the bytes of the packed ``state`` (what a save writes).

    Overall: every stored byte over every parameter (tied weights counted once, a compressed
    matrix counted as its ``out * in`` weights). Linears: the bytes of the compressed linear
    layers' representations (codes, scales, codebooks; biases excluded) over their weights,
    compressed embeddings and the head tied to them excluded. Plus a per-layer table.
    """
    layers = quantized_layers(model)
    shared = shared_layers(layers)
    nbytes = {k: t.numel() * t.element_size() for k, t in state.items()}
    table, linear_bytes, linear_weights, compressed = {}, 0, 0, 0
    for name, layer in layers.items():
        if name in shared:
            table[name] = {"shape": [layer.out_features, layer.in_features],
                           "representation": f"shared with {shared[name]}"}
            continue
        prefix = f"{name}.qweight."
        size = sum(b for k, b in nbytes.items() if k.startswith(prefix))
        weights = layer.in_features * layer.out_features
        table[name] = {"shape": [layer.out_features, layer.in_features],
                       "representation": layer.qweight.config.type_name,
                       "bytes": size, "bits_per_param": 8 * size / weights}
        compressed += weights
        if not isinstance(layer, QuantizedEmbedding) and name not in shared.values():
            linear_bytes += size
            linear_weights += weights
    quantized_ids = {id(p) for m in layers.values() for p in m.qweight.parameters()}
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in quantized_ids)
    total_params, total_bytes = compressed + dense, sum(nbytes.values())
    return {
        "overall_bits_per_param": 8 * total_bytes / total_params if total_params else 0.0,
        "linear_bits_per_param": 8 * linear_bytes / linear_weights if linear_weights else 0.0,
        "params_total": total_params,
        "params_compressed": compressed,
        "stored_bytes": total_bytes,
        "layers": table,
    }


def _dedupe_shared(state: dict[str, Tensor], layout: dict[str, Any]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep each once and
    record the other names as aliases."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            layout["aliases"][key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = t.contiguous()
    return out


def _check_finite(state: dict[str, Tensor], source: str) -> None:
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{source}: tensor {key!r} has {bad} non-finite value(s) (NaN or inf): the model "
                "diverged or the file is damaged, so it is not usable"
            )


def _layout_checksum(layout: dict[str, Any]) -> str:
    body = {k: v for k, v in layout.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def save_quantized(model: nn.Module, directory: str | Path, meta: dict[str, Any] | None = None,
                   companions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write ``model``'s full state (quantized layers packed) to ``directory``, crash-safely
    (see the module docstring), and return the layout written.

    ``meta`` is a JSON record stored with the layout (:func:`read_layout` returns it under
    ``"meta"``), to which the save adds ``"bits"``: :func:`storage_report` of what it wrote.
    ``companions`` name files already in ``directory`` (e.g. ``config.json``) whose checksums
    the layout records, so loading notices if they no longer belong to it. Refuses a model
    with non-finite parameters.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_temporaries(directory)
    state, layout = pack_state(model)
    _check_finite(state, "the model to save")
    bits = storage_report(model, state)
    weights_file, digest = save_tensors_by_content(state, directory, WEIGHTS_PREFIX,
                                                   metadata={"format": FORMAT_NAME})
    layout["weights"] = {"file": weights_file, "sha256": digest,
                         "bytes": (directory / weights_file).stat().st_size}
    layout["companions"] = {name: sha256_file(directory / name) for name in companions}
    layout["meta"] = {"bits": bits, **(meta or {})}
    layout["checksum"] = _layout_checksum(layout)
    write_json_atomic(directory / LAYOUT_FILE, layout)  # the commit point
    for old in directory.glob(f"{WEIGHTS_PREFIX}*.safetensors"):
        if old.name != weights_file:
            old.unlink(missing_ok=True)
    return layout


def update_meta(directory: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Replace the JSON record stored with a checkpoint's layout (an atomic re-commit)."""
    path = Path(directory) / LAYOUT_FILE
    layout = read_layout(directory)
    layout["meta"] = meta
    layout["checksum"] = _layout_checksum(layout)
    write_json_atomic(path, layout)
    return layout


def read_layout(directory: str | Path) -> dict[str, Any]:
    """The checked JSON layout of a checkpoint; a :class:`CheckpointError` says what is wrong
    (missing, not JSON, edited after saving, an unknown format, a malformed entry)."""
    directory = Path(directory)
    path = directory / LAYOUT_FILE
    if not path.is_file():
        if directory.is_dir() and any(directory.glob(f"{WEIGHTS_PREFIX}*.safetensors")):
            raise CheckpointError(
                f"{directory} is an incomplete pvtune checkpoint: {LAYOUT_FILE}, written last, "
                "is missing, so a save was interrupted; save the model again"
            )
        raise CheckpointError(f"{directory} is not a pvtune checkpoint: {LAYOUT_FILE} is missing")
    try:
        layout = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {err})") from None
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path} is corrupted: expected a JSON object, got "
                              f"{type(layout).__name__}")
    if layout.get("format") != FORMAT_NAME or layout.get("version") not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: unsupported format {layout.get('format')!r} v{layout.get('version')}; "
            f"this pvtune reads {FORMAT_NAME} v1 and v{FORMAT_VERSION}"
        )
    if layout["version"] >= 2 and layout.get("checksum") != _layout_checksum(layout):
        raise CheckpointError(
            f"{path} was modified after it was saved (its checksum does not match): a damaged "
            "or hand-edited layout could misdescribe the codes, so it is refused"
        )
    _check_layout_entries(layout, path)
    return layout


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is malformed: {what}")


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_layout_entries(layout: dict[str, Any], path: Path) -> None:
    for key in ("layers", "packed", "dtypes", "aliases"):
        if not isinstance(layout.get(key, {}), dict):
            raise _fail(path, f"'{key}' must be an object")
    for key in ("layers", "packed", "dtypes"):
        if key not in layout:
            raise _fail(path, f"the '{key}' entry is missing")
    for name, spec in layout["layers"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict) \
                or not _is_int(spec.get("out_features"), 1) \
                or not _is_int(spec.get("in_features"), 1) \
                or not isinstance(spec.get("bias"), bool):
            raise _fail(path, f"layer {name!r} needs config (object), out_features and "
                              f"in_features (positive ints) and bias (true/false), got {spec!r}")
        if spec.get("kind", "linear") not in LAYER_KINDS \
                or not isinstance(spec.get("shares", ""), str) \
                or spec.get("shares", name) not in layout["layers"]:
            raise _fail(path, f"layer {name!r}: 'kind' must be one of "
                              f"{', '.join(LAYER_KINDS.names())} and 'shares' must name another "
                              f"layer, got {spec!r}")
        problem = LAYER_KINDS.get(spec.get("kind", "linear")).layout_problem(spec)
        if problem:
            raise _fail(path, f"layer {name!r}: {problem}")
        if not isinstance(spec.get("activations", {}), dict):
            raise _fail(path, f"layer {name!r}: 'activations' must be an object")
    for key, spec in layout["packed"].items():
        if not isinstance(spec, dict) or spec.get("dtype") not in CODE_DTYPES \
                or not isinstance(spec.get("shape"), list) \
                or not all(_is_int(d) for d in spec["shape"]):
            raise _fail(path, f"packed tensor {key!r} needs dtype (one of {CODE_DTYPES}) and "
                              f"shape (a list of ints), got {spec!r}")
        try:
            codec_from_dict(spec)
        except ValueError as err:
            raise _fail(path, f"packed tensor {key!r}: {err}") from None
    for key, dtype in layout["dtypes"].items():
        if dtype not in FLOAT_DTYPES:
            raise _fail(path, f"tensor {key!r} has unknown dtype {dtype!r}; known: "
                              f"{FLOAT_DTYPES}")
    for key, target in layout.get("aliases", {}).items():
        if not isinstance(target, str):
            raise _fail(path, f"alias {key!r} must name a tensor, got {target!r}")
    if layout["version"] >= 2:
        weights = layout.get("weights")
        if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) \
                or "/" in weights["file"] or not isinstance(weights.get("sha256"), str):
            raise _fail(path, f"'weights' must name the tensor file and its sha256, got "
                              f"{weights!r}")
        if not isinstance(layout.get("meta", {}), dict) \
                or not isinstance(layout.get("companions", {}), dict):
            raise _fail(path, "'meta' and 'companions' must be objects")


def weights_path(directory: str | Path, layout: dict[str, Any]) -> Path:
    """The tensor file a layout names."""
    if layout["version"] == 1:
        return Path(directory) / LEGACY_WEIGHTS_FILE
    return Path(directory) / layout["weights"]["file"]


def read_state(directory: str | Path, layout: dict[str, Any]) -> dict[str, Tensor]:
    """The verified tensors of a checkpoint (still packed): the file the layout names, its
    checksum, and the companion files' checksums are checked."""
    directory = Path(directory)
    weights = weights_path(directory, layout)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {weights.name}, named by {LAYOUT_FILE}, is missing; "
                              "the checkpoint is incomplete")
    if layout["version"] >= 2:
        if sha256_file(weights) != layout["weights"]["sha256"]:
            raise CheckpointError(
                f"{weights} is damaged: its SHA-256 does not match the one recorded at save time "
                "(a truncated copy or changed bytes); restore it from a good copy"
            )
        for name, digest in layout.get("companions", {}).items():
            companion = directory / name
            if not companion.is_file() or sha256_file(companion) != digest:
                raise CheckpointError(
                    f"{directory}/{name} is missing or was changed after the checkpoint was "
                    "saved (or a save was interrupted), so it may not describe these weights"
                )
    else:
        log.warning("%s was written by pvtune format v1: it has no checksums to verify", directory)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is truncated or corrupted: {err}") from None


def unpack_state(state: dict[str, Tensor], layout: dict[str, Any],
                 source: str = "checkpoint") -> dict[str, Tensor]:
    """Inverse of :func:`pack_state`: unpack codes, restore dtypes and tied aliases; refuses
    non-finite continuous values."""
    state = dict(state)
    for key, spec in layout["packed"].items():
        if key not in state:
            raise CheckpointError(f"{source} lacks tensor {key!r}: corrupted checkpoint")
        numel = math.prod(spec["shape"])
        packed = state[key]
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise CheckpointError(f"{source}: packed tensor {key!r} must be 1-D uint8, got "
                                  f"{packed.dtype} {tuple(packed.shape)}")
        try:
            codes = codec_from_dict(spec).unpack(packed, numel)
        except ValueError as err:
            raise CheckpointError(f"{source}: tensor {key!r}: {err}") from None
        state[key] = codes.reshape(spec["shape"]).to(getattr(torch, spec["dtype"]))
    for key, dtype in layout["dtypes"].items():
        if key in state:
            state[key] = state[key].to(getattr(torch, dtype))
    _check_finite(state, source)
    for key, alias_of in layout.get("aliases", {}).items():
        if alias_of not in state:
            raise CheckpointError(f"{source}: alias {key!r} names a missing tensor {alias_of!r}")
        state[key] = state[alias_of]
    return state


def _replacement(model: nn.Module, name: str, spec: dict[str, Any], source: str,
                 done: dict[str, QuantizedLinear]):
    """The empty QuantizedLinear (or QuantizedEmbedding) for layer ``name``, checked against
    the model's layer; a layer that shares another's representation gets that one."""
    if not name:
        raise CheckpointError(f"{source}: a layer without a name cannot be placed in a model")
    try:
        current = model.get_submodule(name) if name else model
    except AttributeError:
        raise CheckpointError(f"{source}: layer {name!r} does not exist in the model (a "
                              "checkpoint of another architecture?)") from None
    layer = _replacement_layer(current, name, spec, source, done)
    if "activations" in spec:
        layer.input_quantizer = input_quantizer_from_spec(spec["activations"])
    return layer


def _replacement_layer(current: nn.Module, name: str, spec: dict[str, Any], source: str,
                       done: dict[str, QuantizedLinear]):
    """The compressed layer a layout entry describes, built by the layer class registered for
    its kind (``linear`` when the entry names none)."""
    return LAYER_KINDS.get(spec.get("kind", "linear")).from_layout(current, name, spec, source,
                                                                   done)


def _check_codes_match(layer: QuantizedLinear, name: str, layout: dict[str, Any],
                       source: str) -> None:
    """The packed codes must be exactly what the layer's representation stores."""
    for buf, codec in layer.qweight.integer_codecs().items():
        key = f"{name}.qweight.{buf}"
        spec = layout["packed"].get(key)
        expected = {**codec.to_dict(), "shape": list(getattr(layer.qweight, buf).shape),
                    "dtype": str(getattr(layer.qweight, buf).dtype).removeprefix("torch.")}
        if spec != expected:
            raise CheckpointError(
                f"{source}: the codes of {key!r} are stored as {spec} but the layer's "
                f"representation ({layer.qweight.config.to_dict()}) needs {expected}: the layout "
                "does not describe the stored codes"
            )


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model`` (in place).

    ``model`` must have the original architecture with plain ``nn.Linear`` layers (or
    already-quantized ones) where the checkpoint has quantized layers, with the same shapes
    and biases. All or nothing: every check runs before the model is changed, so a failure
    leaves it as it was.
    """
    directory = Path(directory)
    layout = read_layout(directory)
    source = str(weights_path(directory, layout))
    undo = _undo_record(model, layout.get("attached", {}))
    try:
        install_attached_(model, layout.get("attached", {}), source)
        return _load_into(model, directory, layout, source)
    except BaseException:
        _undo(model, undo)
        raise


def _undo_record(model: nn.Module, attached: Any) -> tuple[list, dict]:
    """What installing ``attached`` would replace: the modules at those names, and the
    attention implementation of the model's config."""
    modules = []
    for name in attached if isinstance(attached, dict) else ():
        parent, _, child = str(name).rpartition(".")
        try:
            owner = model.get_submodule(parent)
        except AttributeError:
            continue
        modules.append((owner, child, getattr(owner, child, None)))
    config = getattr(model, "config", None)
    return modules, {"config": config,
                     "attn": getattr(config, "_attn_implementation", None) if config else None}


def _undo(model: nn.Module, record: tuple[list, dict]) -> None:
    modules, config = record
    for owner, child, old in modules:
        if old is None:
            if hasattr(owner, child):
                delattr(owner, child)
        else:
            setattr(owner, child, old)
    if config["config"] is not None and config["attn"] is not None:
        config["config"]._attn_implementation = config["attn"]


def _load_into(model: nn.Module, directory: Path, layout: dict[str, Any], source: str
               ) -> nn.Module:
    replacements = {}
    for name, spec in layout["layers"].items():
        if layout["version"] == 1 and spec["config"].get("type") == "nm_sparse":
            raise CheckpointError(f"{directory} stores N:M layers in pvtune's v1 layout (every "
                                  "value kept); this pvtune cannot read it: compress again")
        replacements[name] = _replacement(model, name, spec, source, replacements)
        if "shares" not in spec:
            _check_codes_match(replacements[name], name, layout, source)
    state = unpack_state(read_state(directory, layout), layout, source=source)
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k == n or k.startswith(n + ".") for n in replacements)}
    for name, layer in replacements.items():
        expected.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{directory} does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {wrong[:5]}"
        )
    for name, layer in replacements.items():
        set_submodule(model, name, layer)
    model.load_state_dict(state, strict=True)
    return model
