"""What a user asks of compression, and the rules that turn it into a :class:`CompressConfig`.

``pvtune compress`` and a notebook user go through the same rules::

    request = CompressRequest(budget=BudgetConfig.for_types(target_bytes=60 * 2**20))
    config = compress_config(request, PRESETS["demo"])
    compress_model(model, calibration_ids, config)

The rules: the initialiser is the one named (default: GPTQ when a GGUF block type or a size
budget is asked for, else AQLM); a budget picks every tensor's GGUF block type itself, so it
takes no fixed format and no embedding type; initialisers that fit a scalar grid (RTN, GPTQ)
get no block fine-tuning unless its steps or learning rate are asked for; AQLM takes the
preset's search effort and its codebook layout; JLCM takes ``bits``, ``row_groups`` and
``grouping`` for its grouped codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvtune.errors import ConfigError
from pvtune.init.registry import get_init
from pvtune.llm.activation_quant import ActivationKVConfig
from pvtune.llm.budget import BudgetConfig
from pvtune.llm.data import CalibrationConfig
from pvtune.llm.pipeline import BlockFinetuneConfig, CompressConfig
from pvtune.llm.recipes import Preset
from pvtune.reprs import AQLMConfig, GGUFBlockConfig, GroupedCodebookConfig, UniformConfig
from pvtune.rotation import RotationConfig

DENSE_EMBEDDINGS = "f16"


@dataclass(frozen=True)
class CompressRequest:
    """The choices of one compression, each None or default where the preset decides.

    ``method``: a registered initialiser (None: :func:`default_method`); ``format``: one GGUF
    block type for every decoder linear; ``bits``, ``group_size`` (None: per row),
    ``symmetric``: the uniform grid otherwise; ``codebooks``: the AQLM layout ``MxBgG``;
    ``embeddings``: the token embeddings' GGUF type (``f16``: left dense); ``budget``: a
    size budget choosing every tensor's type; ``num_sequences``, ``sequence_length``:
    calibration (None: the preset's); ``block_finetune_steps``, ``block_finetune_lr``:
    block fine-tuning (None: the preset's, for AQLM only).
    """

    method: str | None = None
    format: str | None = None
    bits: int = 2
    group_size: int | None = 64
    symmetric: bool = False
    codebooks: str = "2x8g8"
    row_groups: int = 8
    grouping: str = "moments"
    embeddings: str = DENSE_EMBEDDINGS
    budget: BudgetConfig | None = None
    rotation: RotationConfig | None = None
    activations: ActivationKVConfig | None = None
    num_sequences: int | None = None
    sequence_length: int | None = None
    block_finetune_steps: int | None = None
    block_finetune_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method is not None:
            get_init(self.method)  # an unknown name lists the registered ones


def default_method(request: CompressRequest) -> str:
    """GPTQ where the request asks for GGUF block types (a format or a budget), else AQLM."""
    if request.method is not None:
        return request.method
    return "gptq" if request.format is not None or request.budget is not None else "aqlm"


def _block_finetune(request: CompressRequest, preset: Preset,
                    scalar: bool) -> BlockFinetuneConfig | None:
    asked = request.block_finetune_steps is not None or request.block_finetune_lr is not None
    if not asked:
        return None if scalar else preset.block_finetune
    base = preset.block_finetune
    steps = request.block_finetune_steps if request.block_finetune_steps is not None \
        else (base.steps if base else 20)
    lr = request.block_finetune_lr if request.block_finetune_lr is not None \
        else (base.lr if base else 1e-3)
    return BlockFinetuneConfig(steps=steps, lr=lr)


def compress_config(request: CompressRequest, preset: Preset) -> CompressConfig:
    """The :class:`CompressConfig` of ``request`` under ``preset`` (see the module docstring
    for the rules); a :class:`ConfigError` for choices that do not go together."""
    method = default_method(request)
    init = get_init(method)
    calibration = CalibrationConfig(
        num_sequences=request.num_sequences if request.num_sequences is not None
        else preset.calibration.num_sequences,
        sequence_length=request.sequence_length if request.sequence_length is not None
        else preset.calibration.sequence_length,
        seed=request.seed)
    codebook = any(issubclass(t, AQLMConfig) for t in init.repr_types)
    grouped = any(issubclass(t, GroupedCodebookConfig) for t in init.repr_types)
    method_config = preset.aqlm if isinstance(preset.aqlm, init.config_cls) \
        else init.config_cls()
    if request.budget is not None:
        if codebook or request.format is not None or request.embeddings != DENSE_EMBEDDINGS:
            raise ConfigError("a size budget chooses every tensor's GGUF block type itself: "
                              "use it with a scalar initialiser (gptq or rtn), without a fixed "
                              "format or embeddings type")
        return CompressConfig(method=method, representation=GGUFBlockConfig("q4_0"),
                              method_config=method_config, calibration=calibration,
                              block_finetune=_block_finetune(request, preset, True),
                              budget=request.budget, rotation=request.rotation,
                              activations=request.activations)
    if codebook:
        if request.format is not None:
            raise ConfigError(f"a GGUF block type ({request.format}) needs a scalar "
                              f"initialiser (gptq or rtn), not {method}; AQLM models export "
                              "in the AQLM format")
        representation = AQLMConfig.preset(request.codebooks, seed=request.seed)
    elif grouped:
        if request.format is not None:
            raise ConfigError(f"{method} stores grouped codebooks, not a GGUF block type")
        representation = GroupedCodebookConfig(bits=request.bits, groups=request.row_groups,
                                               grouping=request.grouping, seed=request.seed)
    elif request.format is not None:
        representation = GGUFBlockConfig(request.format)
    else:
        representation = UniformConfig(bits=request.bits, group_size=request.group_size or None,
                                       symmetric=request.symmetric)
    embeddings = None if request.embeddings == DENSE_EMBEDDINGS \
        else GGUFBlockConfig(request.embeddings)
    return CompressConfig(method=method, representation=representation,
                          method_config=method_config, calibration=calibration,
                          block_finetune=_block_finetune(request, preset, not codebook),
                          embeddings=embeddings, rotation=request.rotation,
                          activations=request.activations)
