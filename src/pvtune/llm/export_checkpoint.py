"""``export_checkpoint_gguf`` and ``export_checkpoint_aqlm``: a saved pvtune checkpoint as
a file an inference engine runs, the whole job ``pvtune export`` runs, for a notebook user
too::

    outcome = export_checkpoint_gguf(Path("demo-60mib"))          # demo-60mib.gguf
    check = verify_gguf(outcome, windows)                          # llama.cpp's perplexity
    check.verification.agrees

The rules they own: the output defaults to a name beside the checkpoint; an existing output
is refused unless overwriting is allowed; the token embeddings and an untied head take the
type a size budget chose for them (``f16`` where it chose dense storage, else ``q8_0``)
unless one is named; the checkpoint's BOS choice and the metadata recorded from its source
GGUF (pre-tokenizer, BOS flag) go into the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pvtune.errors import ConfigError, OutputError
from pvtune.export import GGUFExportConfig, export_gguf
from pvtune.export.aqlm import AQLMExportReport, export_aqlm
from pvtune.export.gguf import GGUFExportReport
from pvtune.llm.activation_quant import runtime_quantization
from pvtune.llm.bos import BosChoice
from pvtune.llm.checkpoint import load_compressed, read_meta
from pvtune.llm.evaluate import evaluation_record
from pvtune.llm.sources import recorded_gguf

log = logging.getLogger(__name__)


@dataclass
class GGUFExportOutcome:
    """What :func:`export_checkpoint_gguf` wrote: the ``report`` (file, bytes, each tensor's
    type), the checkpoint's ``model``, ``tokenizer`` and record ``meta``."""

    report: GGUFExportReport
    model: nn.Module
    tokenizer: Any
    meta: dict

    @property
    def type_counts(self) -> dict[str, int]:
        """How many tensors the file holds in each GGUF type."""
        counts: dict[str, int] = {}
        for kind in self.report.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class GGUFCheck:
    """The checkpoint's perplexity in pvtune (``pvtune``: a checkpoint's evaluation record)
    next to llama.cpp's of the exported file (``llamacpp``) on the same windows."""

    pvtune: dict
    llamacpp: Any
    verification: Any


def default_gguf_output(source: Path) -> Path:
    """Where a GGUF export of the checkpoint ``source`` goes unless told: ``SOURCE.gguf``."""
    return source.with_name(f"{source.name}.gguf")


def default_aqlm_output(source: Path) -> Path:
    """Where an AQLM export of the checkpoint ``source`` goes unless told: ``SOURCE-aqlm``."""
    return source.with_name(f"{source.name}-aqlm")


def dense_types(meta: dict) -> tuple[str, str | None]:
    """The GGUF types of the token embeddings and an untied head the checkpoint's record
    asks for: ``f16`` where a size budget chose dense storage, else ``q8_0`` (and the
    embeddings' type for the head)."""
    plan = meta.get("budget_plan")
    planned = (plan.get("types") or {}) if isinstance(plan, dict) else {}
    embeddings = "f16" if planned.get("embeddings") == "f16" else "q8_0"
    head = "f16" if planned.get("head") == "f16" else None
    return embeddings, head


def export_checkpoint_gguf(source: Path, output: Path | None = None,
                           embedding_type: str | None = None, head_type: str | None = None,
                           overwrite: bool = False) -> GGUFExportOutcome:
    """Write the pvtune checkpoint ``source`` as the GGUF file ``output`` (None:
    :func:`default_gguf_output`), each tensor in its own type; ``embedding_type`` and
    ``head_type`` override :func:`dense_types`. Raises :class:`~pvtune.errors.OutputError`
    for an output that exists (unless ``overwrite``) or is a folder,
    :class:`~pvtune.errors.ConfigError` for layers no GGUF type holds (for example AQLM),
    :class:`~pvtune.errors.ModelError` for an architecture with no GGUF export."""
    source = Path(source)
    output = Path(output) if output is not None else default_gguf_output(source)
    if output.exists() and output.is_dir():
        raise OutputError(f"the output {output} is a folder; give a file name ending in .gguf")
    if output.exists() and not overwrite:
        raise OutputError(f"{output} exists; allow overwriting it or choose another file")
    model, tokenizer = load_compressed(source)
    _refuse_runtime_quantization(model, source, "a GGUF file")
    meta = read_meta(source)
    planned_embeddings, planned_head = dense_types(meta)
    config = GGUFExportConfig(embedding_type=embedding_type or planned_embeddings,
                              head_type=head_type or planned_head)
    report = export_gguf(model, tokenizer, output, config, name=f"pvtune {source.name}",
                         recorded_gguf=recorded_gguf(meta))
    return GGUFExportOutcome(report, model, tokenizer, meta)


def verify_gguf(outcome: GGUFExportOutcome, windows: Tensor) -> GGUFCheck:
    """Perplexity of the exported checkpoint in pvtune and of its file in llama.cpp, on the
    same ``windows`` (with the checkpoint's BOS choice); a warning when the two differ by
    more than the verification tolerance. Needs llama-cpp-python."""
    from pvtune.export.llamacpp import Verification, llamacpp_perplexity

    meta = outcome.meta
    bos = BosChoice.from_dict(meta["bos"]) if "bos" in meta else None
    ours = evaluation_record(outcome.model, windows, "checkpoint in pvtune", bos)
    path = outcome.report.path
    log.info("evaluating %s in llama.cpp on the same %d windows", path, windows.shape[0])
    theirs = llamacpp_perplexity(path, windows, bos)
    check = Verification(ours["perplexity"], theirs.perplexity)
    if not check.agrees:
        log.warning("llama.cpp's perplexity differs from pvtune's by %.1f%% (over %.0f%%)",
                    100 * (check.ratio - 1), 100 * check.tolerance)
    return GGUFCheck(ours, theirs, check)


def export_checkpoint_aqlm(source: Path, output: Path | None = None,
                           overwrite: bool = False) -> AQLMExportReport:
    """Write the pvtune checkpoint ``source`` (AQLM-compressed) as an AQLM Hugging Face
    folder ``output`` (None: :func:`default_aqlm_output`). Raises
    :class:`~pvtune.errors.OutputError` for an output that exists and is not an empty
    folder (unless ``overwrite``), :class:`~pvtune.errors.ConfigError` for a checkpoint
    without AQLM layers."""
    source = Path(source)
    output = Path(output) if output is not None else default_aqlm_output(source)
    if output.exists() and not output.is_dir():
        raise OutputError(f"the output {output} is a file; give a folder for the AQLM model")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"{output} exists and is not an empty folder; allow overwriting it "
                          "or choose another output")
    model, tokenizer = load_compressed(source)
    _refuse_runtime_quantization(model, source, "an AQLM model")
    return export_aqlm(model, tokenizer, output)


def _refuse_runtime_quantization(model, source: Path, target: str) -> None:
    """A :class:`ConfigError` for a checkpoint whose computation ``target`` cannot hold."""
    what = runtime_quantization(model)
    if what is not None:
        raise ConfigError(f"{source} computes with {what}, which {target} cannot hold (its "
                          "engine would run another model): evaluate and run it with pvtune "
                          "(pvtune eval, pvtune ask)")


__all__ = ["GGUFCheck", "GGUFExportOutcome", "default_aqlm_output", "default_gguf_output",
           "dense_types", "export_checkpoint_aqlm", "export_checkpoint_gguf", "verify_gguf"]
