"""The command line on a tiny local model: compress, eval, generate, and its error paths."""

from __future__ import annotations

import json
import re

import pytest

from pvtune.cli import main
from pvtune.llm.checkpoint import read_meta

COMMON = ["--num-seqs", "4", "--seq-len", "24", "--eval-window", "24", "--max-new-tokens", "5"]


@pytest.fixture(scope="module")
def compressed(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    rc = main(["compress", str(llama_dir), "--method", "gptq", "--bits", "3",
               "--group-size", "16", "--calib-text", str(text_file), "--eval-text",
               str(text_file), "--output", str(out), *COMMON])
    assert rc == 0
    return out


def test_compress_writes_checkpoint_and_summary(compressed, capsys):
    meta = read_meta(compressed)
    assert meta["compress_config"]["method"] == "gptq"
    assert meta["bits"]["linear_bits_per_param"] == pytest.approx(3 + 19 / 16)
    assert meta["evaluation"]["after"]["perplexity"] > 1


def test_eval_reproduces_compress_perplexity(compressed, text_file, capsys):
    expected = read_meta(compressed)["evaluation"]["after"]["perplexity"]
    assert main(["eval", str(compressed), "--eval-text", str(text_file), "--eval-window", "24",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    value = float(re.search(r"\| perplexity\s+\| ([0-9.]+)", printed).group(1))
    assert f"{value:.3f}" == f"{expected:.3f}"


def test_generate(compressed, capsys):
    assert main(["generate", str(compressed), "--prompt", "The quick", "--max-new-tokens",
                 "4"]) == 0
    assert capsys.readouterr().out.startswith("The quick")


def test_errors_are_messages_not_tracebacks(tmp_path, llama_dir, text_file, capsys):
    assert main(["compress", str(tmp_path / "missing"), "--no-eval"]) == 2
    assert "does not exist" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["compress", str(llama_dir), "--method", "rtn", "--calib-text", str(short),
                 "--no-eval", "--output", str(tmp_path / "o")]) == 2
    assert "fewer than one sequence" in capsys.readouterr().err
    assert main(["compress", str(llama_dir), "--method", "gptq", "--group-size", "24",
                 "--calib-text", str(text_file), "--no-eval", "--output", str(tmp_path / "p"),
                 "--num-seqs", "2", "--seq-len", "16"]) == 2
    assert "group_size=24 does not divide in_features=32" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bad / "pvtune_layout.json").write_text("{")
    assert main(["eval", str(bad)]) == 2
    assert "pvtune_layout.json is corrupted (not valid JSON" in capsys.readouterr().err


def test_output_not_overwritten(compressed, llama_dir, text_file, capsys):
    assert main(["compress", str(llama_dir), "--method", "rtn", "--calib-text", str(text_file),
                 "--no-eval", "--output", str(compressed)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_reprs_table(capsys):
    assert main(["reprs", "--out-features", "64", "--in-features", "256"]) == 0
    out = capsys.readouterr().out
    assert "aqlm" in out and "SQNR dB" in out


