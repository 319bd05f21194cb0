"""The command line on a tiny local model: compress, eval, generate, and every bad input,
damaged file and dangerous output a new user might try: each is one clear line and exit
code 2, found before the work, with nothing finished thrown away."""

from __future__ import annotations

import json
import re
import shutil

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


def rtn(llama_dir, text_file, output, *extra):
    return ["compress", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "16",
            "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2", "--seq-len", "16",
            "--max-new-tokens", "0", "--output", str(output), *extra]


def finetune_args(checkpoint, text_file, output, *extra):
    return ["finetune", str(checkpoint), "--steps", "2", "--num-seqs", "2", "--seq-len", "16",
            "--calib-text", str(text_file), "--eval-text", str(text_file), "--eval-window", "16",
            "--output", str(output), *extra]


def error_of(capsys) -> str:
    """The command's error: exactly one line on stderr after any progress output."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    assert "Traceback" not in "\n".join(err)
    error_of.last = err[-1]
    assert err[-1].startswith("pvtune "), err[-3:]
    return err[-1]


def test_compress_writes_checkpoint_and_summary(compressed):
    meta = read_meta(compressed)
    assert meta["compress_config"]["method"] == "gptq"
    # bits from the bytes stored: the formula 3 + 19/16 up to byte padding of code streams
    assert meta["bits"]["linear_bits_per_param"] == pytest.approx(3 + 19 / 16, abs=0.01)
    assert meta["evaluation"]["compressed"]["perplexity"] > 1
    assert meta["source_model"] == str(meta_source(compressed))
    assert meta["bos"] == {"add": False, "token_id": None,
                           "reason": "the tokenizer adds none and the architecture needs none"}
    assert len(meta["layers"]) == 14  # the per-layer table lives in the record, not stdout


def meta_source(checkpoint):
    return read_meta(checkpoint)["source_model"]


def test_compress_prints_a_summary_not_a_layer_table(llama_dir, text_file, tmp_path, capsys):
    assert main(rtn(llama_dir, text_file, tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert "bits/param (whole model, stored)" in out and "size on disk" in out
    assert "self_attn.q_proj" not in out  # 14 rows here, 210 on SmolLM2: in the metadata


def test_eval_reproduces_compress_perplexity(compressed, text_file, capsys):
    expected = read_meta(compressed)["evaluation"]["compressed"]["perplexity"]
    assert main(["eval", str(compressed), "--eval-text", str(text_file), "--eval-window", "24",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    value = float(re.search(r"\| perplexity\s+\| ([0-9.]+)", printed).group(1))
    assert f"{value:.3f}" == f"{expected:.3f}"


def test_generate(compressed, capsys):
    assert main(["generate", str(compressed), "--prompt", "The quick", "--max-new-tokens",
                 "4"]) == 0
    assert capsys.readouterr().out.startswith("The quick")


def test_reprs_table(capsys):
    assert main(["reprs", "--out-features", "64", "--in-features", "256"]) == 0
    out = capsys.readouterr().out
    assert "aqlm" in out and "SQNR dB" in out


# -- bad values are refused where they are typed ------------------------------------------


@pytest.mark.parametrize("bad", [["--num-seqs", "0"], ["--seq-len", "0"], ["--eval-window", "0"],
                                 ["--prompt", ""], ["--max-new-tokens", "-1"],
                                 ["--block-finetune-lr", "-1"]])
def test_bad_values_are_refused_not_replaced(bad, llama_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(llama_dir), *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and ("must be" in err or "empty" in err)


def test_missing_and_wrong_inputs(tmp_path, llama_dir, text_file, capsys, monkeypatch):
    assert main(["compress", str(tmp_path / "missing"), "--no-eval"]) == 2
    assert "does not exist" in error_of(capsys)
    # a mistyped local path with one '/' is not sent to the model hub
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "models/smol"]) == 2
    assert "'models/smol' does not exist" in error_of(capsys)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(rtn(llama_dir, short, tmp_path / "o")) == 2
    assert "fewer than one sequence" in error_of(capsys)
    assert main(rtn(llama_dir, tmp_path, tmp_path / "o2")) == 2
    assert "is a directory" in error_of(capsys)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    assert main(rtn(llama_dir, binary, tmp_path / "o3")) == 2
    assert "b.txt is not UTF-8 text" in error_of(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    assert main(rtn(llama_dir, bad, tmp_path / "o4")) == 2
    assert "bad.jsonl:1: expected a JSON object with a string 'text' field" in error_of(capsys)


def test_layer_shape_errors_come_before_any_evaluation(llama_dir, text_file, tmp_path, capsys):
    assert main(["compress", str(llama_dir), "--method", "gptq", "--group-size", "24",
                 "--calib-text", str(text_file), "--eval-text", str(text_file),
                 "--output", str(tmp_path / "p"), *COMMON]) == 2
    captured = capsys.readouterr()
    assert "group_size=24 does not divide in_features=32" in captured.err.splitlines()[-1]
    assert "perplexity" not in captured.err + captured.out


def test_model_with_a_wrong_typed_config(tmp_path, llama_dir, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = "wide"
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(broken)]) == 2
    assert "cannot read the model config" in error_of(capsys)
    assert "hidden_size" in error_of.last


# -- outputs that would lose or mix work are refused before the work -----------------------


def test_output_not_overwritten_and_not_a_file(compressed, llama_dir, text_file, tmp_path,
                                               capsys):
    assert main(rtn(llama_dir, text_file, compressed)) == 2
    assert "not empty" in error_of(capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(rtn(llama_dir, text_file, a_file)) == 2
    assert "is a file" in error_of(capsys)
    assert main(rtn(llama_dir, text_file, a_file / "inside")) == 2
    assert "cannot write to the output" in error_of(capsys)


def test_output_that_is_the_source_is_refused(llama_dir, text_file, tmp_path, capsys):
    assert main(rtn(llama_dir, text_file, llama_dir, "--overwrite")) == 2
    assert "is the source model folder" in error_of(capsys)
    ckpt = tmp_path / "c"
    assert main(rtn(llama_dir, text_file, ckpt)) == 0
    assert main(finetune_args(ckpt, text_file, ckpt, "--overwrite")) == 2
    assert "is the source checkpoint" in error_of(capsys)
    assert main(finetune_args(ckpt, text_file, tmp_path / "f", "--teacher", str(ckpt))) == 2
    assert "own teacher" in error_of(capsys)


def test_full_disk_is_found_before_the_work(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    import pvtune.llm.outputs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pvtune.llm.outputs.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    assert main(rtn(llama_dir, text_file, tmp_path / "o")) == 2
    assert "MiB free" in error_of(capsys)
    ckpt = tmp_path / "c"
    monkeypatch.undo()
    assert main(rtn(llama_dir, text_file, ckpt)) == 0
    monkeypatch.setattr(pvtune.llm.outputs.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    assert main(finetune_args(ckpt, text_file, tmp_path / "f")) == 2
    message = error_of(capsys)
    assert "MiB free" in message and "--output" in message


def test_an_output_another_run_is_writing_is_refused(compressed, text_file, tmp_path, capsys):
    from tests.checkpoint.test_files import hold_lock

    out = tmp_path / "busy"
    proc = hold_lock(out)
    try:
        assert main(finetune_args(compressed, text_file, out)) == 2
        assert f"being written by another pvtune run (process {proc.pid}" in error_of(capsys)
        assert main(finetune_args(compressed, text_file, out, "--overwrite")) == 2
        assert "another pvtune run" in error_of(capsys)
    finally:
        proc.kill()
        proc.wait()
    assert main(finetune_args(compressed, text_file, out)) == 0  # free again


def fail_writes_under(monkeypatch, folder):
    """Tokenizer writes under ``folder`` fail as a full file system makes them fail."""
    from transformers import PreTrainedTokenizerBase

    from tests.checkpoint.test_files import FILE_TOO_LARGE

    original = PreTrainedTokenizerBase.save_pretrained

    def save(self, directory, *a, **k):
        if str(directory).startswith(str(folder)):
            raise Exception(FILE_TOO_LARGE)  # noqa: TRY002 - what tokenizers raises
        return original(self, directory, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)


def test_a_failed_final_save_names_the_cause_and_keeps_the_model(compressed, text_file, tmp_path,
                                                                 capsys, monkeypatch):
    import tempfile

    from pvtune.llm.checkpoint import load_compressed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "full"
    fail_writes_under(monkeypatch, out)
    assert main(finetune_args(compressed, text_file, out, "--no-eval")) == 2
    line = error_of(capsys)
    assert f"cannot write {out}: File too large (os error 27)" in line
    assert "no checkpoint was saved there" in line
    rescued = next((tmp_path / "tmp").glob("pvtune-rescued-full-*"))
    assert f"the model is saved in {rescued} instead" in line
    load_compressed(rescued)  # the fine-tuned model, whole
    assert read_meta(rescued)["best_step"] == 2
    # nowhere to write at all: said so, still one line
    fail_writes_under(monkeypatch, tmp_path)
    assert main(finetune_args(compressed, text_file, tmp_path / "full2", "--no-eval")) == 2
    assert "could not be saved elsewhere either" in error_of(capsys)


def test_sample_runs_after_the_save_and_is_optional(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(rtn(llama_dir, text_file, out, "--max-new-tokens", "0")) == 0
    assert "Sample" not in capsys.readouterr().out
    assert read_meta(out)["bits"]["stored_bytes"] > 0


# -- damaged and mismatched checkpoints ----------------------------------------------------


def test_damaged_checkpoints_are_one_line_errors(compressed, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (bad / "pvtune_layout.json").write_text("{")
    assert main(["eval", str(bad)]) == 2
    assert "pvtune_layout.json is corrupted (not valid JSON" in error_of(capsys)
    flipped = tmp_path / "flipped"
    shutil.copytree(compressed, flipped)
    weights = next(flipped.glob("pvtune_model-*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-200:-184] = bytes(b ^ 0x5A for b in raw[-200:-184])
    weights.write_bytes(bytes(raw))
    assert main(["eval", str(flipped)]) == 2
    assert "damaged: its SHA-256 does not match" in error_of(capsys)
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(compressed, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    assert main(["eval", str(no_tokenizer)]) == 2
    assert "has no usable tokenizer" in error_of(capsys)


def test_checkpoint_of_another_architecture(compressed, tmp_path, capsys):
    """A Llama checkpoint with a Qwen2 config (q/k/v biases) is refused, not loaded with the
    biases silently dropped: by the config's checksum, and by the layers' own check."""
    from pvtune.checkpoint import load_quantized
    from pvtune.errors import CheckpointError
    from tests.llm.conftest import build_model

    qwen = tmp_path / "qwen"
    build_model("qwen2", 300).save_pretrained(qwen)
    mixed = tmp_path / "mixed"
    shutil.copytree(compressed, mixed)
    shutil.copy(qwen / "config.json", mixed / "config.json")
    assert main(["eval", str(mixed)]) == 2
    assert "has bias in the model but the checkpoint says bias=False" in error_of(capsys)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj' has bias in "
                                              r"the model but the checkpoint says bias=False"):
        load_quantized(build_model("qwen2", 300), compressed)


def rewrite_meta(checkpoint, edit):
    from pvtune.checkpoint.format import read_layout, update_meta

    meta = read_layout(checkpoint)["meta"]
    edit(meta)
    update_meta(checkpoint, meta)


def test_finetune_teacher_resolution(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    """The teacher is the source recorded (absolute) at compress time, wherever finetune runs
    from; a missing or unrecorded source is an error, never a silent switch to SmolLM2."""
    work = tmp_path / "work"
    shutil.copytree(llama_dir, work / "model")
    monkeypatch.chdir(work)
    assert main(rtn("model", text_file, "ckpt")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(finetune_args(work / "ckpt", text_file, "f", "--no-eval")) == 0
    assert read_meta(elsewhere / "f")["teacher"] == str((work / "model").resolve())
    rewrite_meta(work / "ckpt", lambda meta: meta.pop("source_model"))
    assert main(finetune_args(work / "ckpt", text_file, "g", "--no-eval")) == 2
    assert "does not record the model it was compressed from" in error_of(capsys)
    rewrite_meta(work / "ckpt", lambda meta: meta.update(source_model=5))
    assert main(finetune_args(work / "ckpt", text_file, "g", "--no-eval")) == 2
    assert "source_model must be a string" in error_of(capsys)
    rewrite_meta(work / "ckpt", lambda meta: meta.update(source_model="model"))
    assert main(finetune_args(work / "ckpt", text_file, "g", "--no-eval")) == 2
    assert "as the relative path 'model'" in error_of(capsys)
    rewrite_meta(work / "ckpt", lambda meta: meta.update(source_model=str(tmp_path / "gone")))
    assert main(finetune_args(work / "ckpt", text_file, "g", "--no-eval")) == 2
    assert "which no longer exists; name the uncompressed model as the teacher (on the " \
        "command line: --teacher)" in error_of(capsys)


def test_teacher_with_another_vocabulary(llama_dir, text_file, tmp_path, capsys):
    from tests.llm.conftest import build_model, build_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    build_tokenizer(other)
    build_model("llama", 400).save_pretrained(other)
    ckpt = tmp_path / "c"
    assert main(rtn(llama_dir, text_file, ckpt)) == 0
    assert main(finetune_args(ckpt, text_file, tmp_path / "f", "--teacher", str(other))) == 2
    assert "vocabulary of 400 tokens" in error_of(capsys)


def test_killed_cache_teacher_run_is_not_refused(llama_dir, text_file, tmp_path):
    """A run killed before its first checkpoint leaves only pvtune's own teacher cache: the
    same command runs again."""
    ckpt, out = tmp_path / "c", tmp_path / "f"
    assert main(rtn(llama_dir, text_file, ckpt)) == 0
    (out / "teacher_cache").mkdir(parents=True)
    assert main(finetune_args(ckpt, text_file, out, "--cache-teacher")) == 0


def test_resume_with_other_calibration_is_refused(llama_dir, text_file, tmp_path, capsys):
    ckpt, out = tmp_path / "c", tmp_path / "f"
    assert main(rtn(llama_dir, text_file, ckpt)) == 0
    from pvtune.llm.resume import RESUME_META

    args = finetune_args(ckpt, text_file, out, "--checkpoint-every", "1", "--steps", "3")
    # leave a resume state behind, as a killed run would
    import pvtune.llm.finetune_checkpoint as job

    original = job.finetune
    ft_calls = []

    def stop_early(*a, **k):
        ft_calls.append(1)
        return original(*a, **{**k, "stop_at": 1})

    job.finetune = stop_early
    try:
        main(args)
    finally:
        job.finetune = original
    assert ft_calls and (out / "resume" / RESUME_META).is_file()
    capsys.readouterr()
    assert main([*args, "--num-seqs", "3"]) == 2
    assert "run on other inputs (calibration_tokens differ" in error_of(capsys)
    assert main(args) == 0  # the same command continues it


def test_a_bug_shows_its_traceback(monkeypatch, capsys):
    import pvtune.cli

    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(pvtune.cli, "_cmd_reprs", broken)
    assert main(["reprs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal bug" in err
    assert "this is a bug in pvtune" in err


def test_compress_to_a_size_budget_with_rotation(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "budget"
    args = ["compress", str(llama_dir), "--target-size", "40KiB", "--rotate", "hadamard",
            "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2", "--seq-len", "16",
            "--max-new-tokens", "0", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "types chosen per tensor" in printed and "residual (R1): hadamard" in printed
    meta = read_meta(out)
    assert meta["compress_config"]["method"] == "gptq"  # the default under a budget
    plan = meta["budget_plan"]
    assert plan["total_bytes"] <= 40 * 1024 == plan["budget_bytes"]
    assert meta["rotation"]["untied_head"] and "head" in plan["types"]
    gguf = tmp_path / "budget.gguf"
    assert main(["export", str(out), "--output", str(gguf)]) == 0
    assert gguf.stat().st_size <= 40 * 1024
    capsys.readouterr()
    assert main(["compress", str(llama_dir), "--target-size", "40KiB", "--method", "aqlm",
                 "--no-eval", "--output", str(tmp_path / "x")]) == 2
    assert "--target-size" in error_of(capsys)
    assert main(["compress", str(llama_dir), "--target-size", "1KiB", "--calib-text",
                 str(text_file), "--no-eval", "--num-seqs", "2", "--seq-len", "16",
                 "--output", str(tmp_path / "y")]) == 2
    assert "below the smallest file" in error_of(capsys)
    with pytest.raises(SystemExit):
        main(["compress", "--target-size", "sixty"])
    assert "cannot read the size 'sixty'" in capsys.readouterr().err


def test_ask_answers_next_to_the_reference(text_file, tmp_path, capsys):
    from tests.llm.conftest import build_model, build_tokenizer

    source = tmp_path / "chatty"
    tok = build_tokenizer(source)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}assistant:")
    tok.save_pretrained(source)
    build_model("llama", len(tok)).save_pretrained(source)
    ckpt = tmp_path / "ckpt"
    assert main(rtn(source, text_file, ckpt)) == 0
    capsys.readouterr()
    assert main(["ask", str(ckpt), "--limit", "3", "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "reference's answer" in printed and "What is the capital of France?" in printed
    assert re.search(r"correct answers: \d of 3; the reference \(.*\): \d of 3", printed)
    assert main(["ask", str(ckpt), "--question", "Why?", "--no-reference",
                 "--max-new-tokens", "2"]) == 0
    assert "reference's answer" not in capsys.readouterr().out
    shutil.copytree(ckpt, tmp_path / "no-template")
    for f in (tmp_path / "no-template").glob("chat_template*"):
        f.unlink()
    config = tmp_path / "no-template" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["ask", str(tmp_path / "no-template")]) == 2
    assert "no chat template" in error_of(capsys)


def test_compress_with_quantized_activations_records_them_and_refuses_export(
        llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "w4a4"
    args = ["compress", str(llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "0",
            "--activations", "4", "--kv-cache", "4", "--calib-text", str(text_file),
            "--eval-text", str(text_file), "--output", str(out), *COMMON]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "activations 4-bit, KV cache 4-bit, clip 0.95; rotations adaptive: R1 on" in printed
    meta = read_meta(out)
    chosen = meta["activation_rotations"]
    assert chosen["residual"] and len(chosen["down"]) == 2 and "off" in chosen["errors"]
    assert main(["eval", str(out), "--eval-text", str(text_file), "--eval-window", "24"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "quantized KV cache" in error_of(capsys) and "run it with pvtune" in error_of.last
    assert main(["compress", str(llama_dir), "--activations", "4", "--rotate", "hadamard",
                 "--no-eval", "--output", str(tmp_path / "y")]) == 2
    assert "--activations" in error_of(capsys)
    with pytest.raises(SystemExit):
        main(["compress", str(llama_dir), "--activations", "1"])


def test_compress_with_jlcm_then_finetune_with_the_proximal_step(llama_dir, text_file, tmp_path,
                                                                 capsys):
    out = tmp_path / "jlcm"
    assert main(["compress", str(llama_dir), "--method", "jlcm", "--bits", "2", "--row-groups",
                 "2", "--grouping", "quantiles", "--calib-text", str(text_file),
                 "--eval-text", str(text_file), "--output", str(out), *COMMON]) == 0
    meta = read_meta(out)
    rep = meta["compress_config"]["representation"]
    assert rep["type"] == "GroupedCodebookConfig" and rep["groups"] == 2
    assert rep["grouping"] == "quantiles"
    tuned = tmp_path / "jlcm-pv"
    assert main(finetune_args(out, text_file, tuned, "--strategy", "proximal_v")) == 0
    assert "proximal_v" in capsys.readouterr().out
    assert main(["export", str(tuned), "--output", str(tmp_path / "j.gguf")]) == 2
    assert "GroupedCodebook" in error_of(capsys) or "grouped" in error_of.last
    assert main(["compress", str(llama_dir), "--method", "jlcm", "--format", "q2_0",
                 "--no-eval", "--output", str(tmp_path / "x")]) == 2
    assert "grouped codebooks" in error_of(capsys)
