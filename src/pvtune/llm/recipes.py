"""Named effort presets for ``pvtune compress``: how much calibration data and search to use."""

from __future__ import annotations

from dataclasses import dataclass

from pvtune.init.aqlm import AQLMInitConfig
from pvtune.llm.data import CalibrationConfig, EvalConfig
from pvtune.llm.pipeline import BlockFinetuneConfig


@dataclass(frozen=True)
class Preset:
    """Calibration size, AQLM search effort, block fine-tuning and evaluation size."""

    description: str
    calibration: CalibrationConfig
    aqlm: AQLMInitConfig
    block_finetune: BlockFinetuneConfig | None
    evaluation: EvalConfig


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "about 13 minutes for SmolLM2-135M on 2 CPU cores: 16 calibration sequences, a short "
        "AQLM search, 8 block fine-tuning steps, 32 evaluation windows",
        CalibrationConfig(num_sequences=16, sequence_length=512),
        AQLMInitConfig(max_rounds=1, codebook_steps=20, beam_size=2),
        BlockFinetuneConfig(steps=8, lr=1e-3),
        EvalConfig(window=512, max_windows=32),
    ),
    "standard": Preset(
        "32 calibration sequences of 512 tokens, two AQLM rounds, 20 block fine-tuning "
        "steps, evaluation on the whole evaluation split (about 22 minutes of AQLM 2x8g8 for "
        "SmolLM2-135M on 2 idle cores)",
        CalibrationConfig(num_sequences=32, sequence_length=512),
        AQLMInitConfig(max_rounds=2),
        BlockFinetuneConfig(steps=20, lr=1e-3),
        EvalConfig(window=512),
    ),
}
