"""The fine-tuning sweep's fixed test (PV below STE at every seed), its arm names and jobs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the script imports its neighbour `common`
_spec = importlib.util.spec_from_file_location("bench_finetune_sweep",
                                               BENCH / "finetune_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def rows(pv: list[float], ste: list[float], rep: str = "q2_0") -> list[dict]:
    out = []
    for seed, (a, b) in enumerate(zip(pv, ste, strict=True)):
        out.append({"phase": "strategies", "representation": rep,
                    "strategy": "subspace_v_ste", "seed": seed, "perplexity": a})
        out.append({"phase": "strategies", "representation": rep, "strategy": "ste",
                    "seed": seed, "perplexity": b})
    return out


def test_pv_holds_only_when_below_ste_at_every_seed():
    assert sweep.verdict(rows([80, 81, 82], [81, 82, 83])) == {
        "q2_0": "PV below STE at 3 of 3 seeds: holds"}
    assert sweep.verdict(rows([80, 83, 82], [81, 82, 83])) == {
        "q2_0": "PV below STE at 2 of 3 seeds: not shown"}
    assert sweep.verdict(rows([80, 81], [81, 82])) == {
        "q2_0": "PV below STE at 2 of 2 seeds: incomplete"}
    # a lost seed decides the test before the last seed has run
    assert sweep.verdict(rows([80, 83], [81, 82])) == {
        "q2_0": "PV below STE at 1 of 2 seeds: not shown"}
    # a tie is not a win
    assert "0 of 3" in sweep.verdict(rows([80, 81, 82], [80, 81, 82]))["q2_0"]


def test_arm_names_and_settings_round_trip():
    assert sweep.arm_name({}) == "default"
    assert sweep.arm_name({"code_lr": 1.0}) == "code_lr=x1"
    assert sweep.arm_name({"lr": 1e-4, "tau": 0.03}) == "lr=0.0001,tau=0.03"
    arm = sweep.parse_settings("lr=1e-4,batch_size=4,schedule=cosine")
    assert arm == {"lr": 1e-4, "batch_size": 4, "schedule": "cosine"}
    assert sweep.arm_name(arm) == "batch_size=4,lr=0.0001,schedule=cosine"


def test_code_steps_are_in_units_of_the_starting_defaults():
    assert sweep.absolute_code_lr("q2_0", "ste", 0.3) == 0.3 * 0.033
    assert sweep.absolute_code_lr("aqlm2x8g8", "subspace_v_ste", 1.0) == 0.016
    assert sweep.absolute_code_lr("q2_0", "frozen", 1.0) is None
