"""Data-parallel PV-Tuning on torch.distributed (gloo, CPU): 2 processes started by torchrun
equal 1 process with the same global batch; a killed rank stops the job with an error (no
hang); a run resumes from its checkpoint at another process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pvtune.distributed import DistributedContext
from pvtune.errors import ConfigError
from pvtune.llm.finetune import finetune
from pvtune.llm.teacher_logits import TeacherLogits
from tests.llm.finetune_worker import REPRESENTATION, config
from tests.llm.test_finetune import setup

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def torchrun(nproc: int, llama_dir, strategy: str, out: Path, checkpoint: Path | None = None,
             die_rank: int = -1, die_at: int = 0, timeout: float = 240,
             placement: str = "replicated"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "tests" / "llm" / "finetune_worker.py"),
           str(llama_dir), strategy, str(STEPS), str(out), str(checkpoint or ""),
           str(die_rank), str(die_at), placement]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def single_process(llama_dir, strategy: str):
    torch.set_num_threads(1)
    student, teacher, ids = setup(llama_dir, REPRESENTATION, n=8)
    result = finetune(student, TeacherLogits(teacher, ids), ids, config(strategy, STEPS),
                      progress=False)
    return student.state_dict(), result.losses


def codes_of(state):
    return {k: v for k, v in state.items() if v.dtype in (torch.uint8, torch.int8, torch.int16,
                                                          torch.int32, torch.int64)}


@pytest.mark.parametrize("placement", ["replicated", "owner", "replicated+shard"])
@pytest.mark.parametrize("strategy", ["subspace_v_ste", "stochastic_rounding"])
def test_two_processes_equal_one(llama_dir, tmp_path, strategy, placement):
    run = torchrun(2, llama_dir, strategy, tmp_path, placement=placement)
    assert run.returncode == 0, run.stderr[-3000:]
    want_state, want_losses = single_process(llama_dir, strategy)
    states = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    sent = []
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["losses"] == pytest.approx(want_losses, rel=1e-4)
        sent.append(record["code_bytes_sent"])
        assert record["sharded"] == placement.endswith("+shard")  # FSDP2 did shard
    # with owners each rank stepped and sent its own share of the codes; replicated: none
    assert all(n > 0 for n in sent) if placement.startswith("owner") else sent == [0, 0]
    want_codes = codes_of(want_state)
    assert want_codes
    for state in states:
        assert all(torch.equal(state[k], v) for k, v in want_codes.items())
        for k, v in want_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-4)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # ranks agree


def test_two_nodes_with_a_rendezvous_point_equal_one_process(llama_dir, tmp_path):
    """The multi-node form (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`), two
    node agents on this machine, one process each."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pvtune",
           str(ROOT / "tests" / "llm" / "finetune_worker.py"), str(llama_dir),
           "subspace_v_ste", str(STEPS), str(tmp_path), "", "-1", "0", "owner"]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:]
    want_state, want_losses = single_process(llama_dir, "subspace_v_ste")
    for r in range(2):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["world_size"] == 2
        assert record["losses"] == pytest.approx(want_losses, rel=1e-4)
        state = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert all(torch.equal(state[k], v) for k, v in codes_of(want_state).items())


@pytest.mark.parametrize("placement", ["replicated", "owner", "owner+shard"])
def test_a_killed_rank_stops_the_job_and_it_resumes_at_another_process_count(llama_dir,
                                                                             tmp_path,
                                                                             placement):
    checkpoint = tmp_path / "ckpt"
    # rank 1 dies in step 4, after the step-2 resume state was written (with owners: the
    # V-step state of rank 1's weights gathered to rank 0)
    run = torchrun(2, llama_dir, "stochastic_rounding", tmp_path / "a", checkpoint,
                   die_rank=1, die_at=4, timeout=120, placement=placement)
    assert run.returncode != 0
    assert "exitcode" in run.stderr and "17" in run.stderr  # torchrun names the dead rank
    assert (checkpoint / "resume_state.json").is_file()
    assert json.loads((checkpoint / "resume_state.json").read_text())["step"] == 2
    # one process; a sharded run's state resumes into a sharded run (the other placement)
    nproc, then = (2, "replicated+shard") if "shard" in placement else (1, "replicated")
    resumed = torchrun(nproc, llama_dir, "stochastic_rounding", tmp_path / "b", checkpoint,
                       placement=then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want_state, _ = single_process(llama_dir, "stochastic_rounding")
    state = load_file(str(tmp_path / "b" / "rank0.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in codes_of(want_state).items())
    for k, v in want_state.items():  # the continuous parameters (Adam state resumed)
        torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-4)


def test_context_shards_evenly_or_says_what_to_change():
    ctx = DistributedContext(rank=1, world_size=2)
    assert ctx.shard(torch.arange(6)).tolist() == [3, 4, 5]
    assert DistributedContext().shard(torch.arange(3)).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="multiple of 2"):
        ctx.shard(torch.arange(5))
    with pytest.raises(ConfigError, match="impossible"):
        DistributedContext(rank=2, world_size=2)


@pytest.mark.parametrize("parallel", [[], ["--shard", "--vstep-placement", "owner"]],
                         ids=["replicated", "owner+shard"])
def test_torchrun_pvtune_finetune_writes_the_single_process_checkpoint(llama_dir, text_file,
                                                                       tmp_path, parallel):
    from pvtune.cli import main
    from pvtune.llm.checkpoint import read_meta
    from pvtune.llm.model import load_causal_lm

    ckpt = tmp_path / "c"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "2",
                 "--group-size", "16", "--calib-text", str(text_file), "--no-eval",
                 "--num-seqs", "2", "--seq-len", "16", "--output", str(ckpt),
                 "--max-new-tokens", "0"]) == 0
    common = ["finetune", str(ckpt), "--steps", "3", "--num-seqs", "4", "--seq-len", "16",
              "--batch-size", "2", "--calib-text", str(text_file), "--eval-text",
              str(text_file), "--eval-window", "16", "--checkpoint-every", "2",
              "--cache-teacher"]
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main([*common, "--output", str(one)]) == 0
    pvtune = Path(sys.executable).parent / "pvtune"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(pvtune), *common, *parallel, "--output",
                          str(two)], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("perplexity, start -> best") == 1  # rank 0 alone reports
    a, _ = load_causal_lm(one)
    b, _ = load_causal_lm(two)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sb[k], v) for k, v in codes_of(sa).items())
    la = read_meta(one)["finetune_result"]["losses"]
    lb = read_meta(two)["finetune_result"]["losses"]
    assert lb == pytest.approx(la, rel=1e-4)
    ea = [p for _, p in read_meta(one)["finetune_result"]["evals"]]
    eb = [p for _, p in read_meta(two)["finetune_result"]["evals"]]
    assert len(ea) == 2 and eb == pytest.approx(ea, rel=1e-4)  # start and end, every rank
    for k, v in sa.items():  # the saved continuous parameters too
        torch.testing.assert_close(sb[k], v, rtol=1e-3, atol=1e-4)
    assert not (two / "resume").exists()  # finished: the resume state is cleared


@pytest.mark.parametrize("method", [
    ["rtn", "--bits", "2", "--group-size", "16"],
    ["gptq", "--bits", "2", "--group-size", "16"],
    ["aqlm", "--codebooks", "1x4g8", "--preset", "demo"],  # with block fine-tuning
], ids=lambda m: m[0])
def test_torchrun_pvtune_compress_gives_the_single_process_codes(llama_dir, text_file,
                                                                 tmp_path, method):
    from pvtune.cli import main
    from pvtune.llm.checkpoint import read_meta
    from pvtune.llm.model import load_causal_lm

    args = ["compress", str(llama_dir), "--method", *method, "--calib-text", str(text_file),
            "--no-eval", "--num-seqs", "4", "--seq-len", "16", "--max-new-tokens", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main([*args, "--output", str(one)]) == 0
    pvtune = Path(sys.executable).parent / "pvtune"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(pvtune), *args, "--output", str(two)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    a, _ = load_causal_lm(one)
    b, _ = load_causal_lm(two)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # codes and scales, bit for bit
    layers_one = [r["name"] for r in read_meta(one)["layers"]]
    assert layers_one == [r["name"] for r in read_meta(two)["layers"]]


def test_layers_are_split_by_size():
    from pvtune.distributed import assign_layers

    owner = assign_layers({"q": 4, "k": 1, "v": 1, "o": 4, "up": 8, "down": 8}, 2)
    load = [sum(s for n, s in {"q": 4, "k": 1, "v": 1, "o": 4, "up": 8, "down": 8}.items()
                if owner[n] == r) for r in range(2)]
    assert load == [13, 13]
    assert set(assign_layers({"a": 1}, 3).values()) == {0}


def test_a_rank_that_cannot_join_says_which_rank_it_is(llama_dir, tmp_path, monkeypatch,
                                                        capsys):
    from pvtune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    code = main(["compress", str(llama_dir), "--method", "rtn", "--bits", "2", "--no-eval",
                 "--output", str(tmp_path / "out"), "--max-new-tokens", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pvtune compress (rank 1 of 2): error: rank 1 of 2 could not join" in err
    assert "Traceback" not in err


def test_a_device_the_machine_lacks_is_refused_clearly(monkeypatch):
    from pvtune.distributed import DistributedError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        DistributedContext.from_environment(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="no CUDA GPU"):
            DistributedContext.from_environment(device="cuda")


def test_evaluation_splits_the_windows_and_every_rank_gets_the_whole_perplexity(llama_dir,
                                                                                tmp_path):
    """5 batches over 2 ranks (one rank repeats a stand-in forward): the perplexity of one
    process, on both ranks."""
    script = tmp_path / "eval_worker.py"
    script.write_text(
        "import json, sys, torch\n"
        "from pvtune.distributed import DistributedContext\n"
        "from pvtune.llm.evaluate import perplexity\n"
        "from pvtune.llm.model import load_causal_lm\n"
        "ctx = DistributedContext.from_environment(timeout_s=30)\n"
        "model, _ = load_causal_lm(sys.argv[1])\n"
        "windows = torch.randint(0, 100, (10, 12), generator=torch.Generator().manual_seed(0))\n"
        "r = perplexity(model, windows, batch_size=2, progress=False, dist=ctx)\n"
        "out = f'{sys.argv[2]}/ppl{ctx.rank}.json'  # a file each: their stdout interleaves\n"
        "with open(out, 'w') as fh:\n"
        "    fh.write(json.dumps([r.perplexity, r.tokens]))\n"
        "ctx.close()  # a barrier, then teardown: no rank exits while another still talks\n"
        "import os; os._exit(0)  # skip finalization, where gloo's threads can abort it\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(script), str(llama_dir), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = [json.loads((tmp_path / f"ppl{r}.json").read_text()) for r in range(2)]
    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.model import load_causal_lm

    model, _ = load_causal_lm(llama_dir)
    windows = torch.randint(0, 100, (10, 12), generator=torch.Generator().manual_seed(0))
    want = perplexity(model, windows, batch_size=2, progress=False)
    assert len(got) == 2 and got[0] == got[1]  # both ranks, bit for bit
    assert got[0][1] == want.tokens == 10 * 11
    assert got[0][0] == pytest.approx(want.perplexity, rel=1e-6)
