from __future__ import annotations

import pytest
import torch

from pvtune.llm.data import (
    CalibrationConfig,
    DataError,
    EvalConfig,
    calibration_batch,
    eval_windows,
    read_texts,
)


def test_read_jsonl_and_txt(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(j) == ["one", "two"]
    t = tmp_path / "b.txt"
    t.write_text("plain text")
    assert read_texts(t) == ["plain text"]


def test_bad_jsonl_names_line(tmp_path):
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a string "
                                        r"'text' field, got no 'text' field"):
        read_texts(j)


@pytest.mark.parametrize(("line", "got"), [
    ('{"text": 5}', "got int"), ('["a list"]', "got a list"), ('"a string"', "got a str"),
    ("{broken", "not valid JSON"),
])
def test_jsonl_lines_that_are_not_text_objects(tmp_path, line, got):
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"x.jsonl:2: .*{got}"):
        read_texts(j)


def test_directory_binary_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_texts(tmp_path)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"b.txt is not UTF-8 text"):
        read_texts(binary)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no documents"):
        read_texts(empty)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "none.txt")


def test_calibration_batch_deterministic_windows():
    stream = torch.arange(1000)
    cfg = CalibrationConfig(num_sequences=5, sequence_length=20, seed=3)
    a, b = calibration_batch(stream, cfg), calibration_batch(stream, cfg)
    assert a.shape == (5, 20) and torch.equal(a, b)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the stream


def test_text_too_short():
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        calibration_batch(torch.arange(10), CalibrationConfig(num_sequences=1, sequence_length=64))
    with pytest.raises(DataError, match="fewer than one window of 512"):
        eval_windows(torch.arange(100), EvalConfig(window=512))


def test_eval_windows_all_and_spread():
    stream = torch.arange(1050)
    all_w = eval_windows(stream, EvalConfig(window=100))
    assert all_w.shape == (10, 100) and all_w[3, 0] == 300
    few = eval_windows(stream, EvalConfig(window=100, max_windows=3))
    assert few[:, 0].tolist() == [0, 400, 900]  # windows 0, round(4.5) = 4, 9


@pytest.mark.parametrize("factory", [
    lambda: CalibrationConfig(num_sequences=0), lambda: CalibrationConfig(sequence_length=1),
    lambda: EvalConfig(window=1), lambda: EvalConfig(max_windows=0),
])
def test_bad_configs(factory):
    with pytest.raises(ValueError, match="must be"):
        factory()


def test_overlap_between_training_and_evaluation_text():
    import torch

    from pvtune.llm.data import overlap_fraction

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 5000, (4, 128), generator=g)
    other = torch.randint(0, 5000, (2, 128), generator=g)
    assert overlap_fraction(text, other) == 0.0
    assert overlap_fraction(text, text[1:3]) == 1.0
    half = torch.cat([text[0, :64], other[0, :64]])[None]
    assert 0.3 < overlap_fraction(text, half) < 0.6
    assert overlap_fraction(text, text[:, :16]) == 0.0  # shorter than a span: nothing to say


def test_cli_says_when_it_evaluates_on_its_training_text(llama_dir, text_file, tmp_path, caplog):
    import logging

    from pvtune.cli import main

    with caplog.at_level(logging.WARNING, logger="pvtune"):
        assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "4",
                     "--group-size", "16", "--calib-text", str(text_file), "--eval-text",
                     str(text_file), "--num-seqs", "2", "--seq-len", "48", "--eval-window",
                     "48", "--max-new-tokens", "0", "--output", str(tmp_path / "c")]) == 0
    assert "also occur in the training text" in caplog.text
