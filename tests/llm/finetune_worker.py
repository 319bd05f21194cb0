"""One process of a data-parallel fine-tune for the distributed tests (started by torchrun):
the tiny model of tests/llm, 2-bit RTN, a few PV steps; each rank writes its final state."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from pvtune.distributed import DistributedContext
from pvtune.llm.finetune import FinetuneConfig, finetune
from pvtune.llm.sharding import full_parameters, is_sharded
from pvtune.llm.teacher_logits import TeacherLogits
from pvtune.optim import VStepConfig
from pvtune.reprs import UniformConfig
from tests.llm.test_finetune import setup

REPRESENTATION = UniformConfig(bits=2, group_size=16)


def config(strategy: str, steps: int, placement: str = "replicated") -> FinetuneConfig:
    """The run every test compares: global micro-batch 4, so 1, 2 or 4 processes fit.
    ``placement``: a V-step placement, with ``+shard`` for FSDP2 sharding. About 5% of the
    groups move a step, under a tau that never binds: a binding cap ranks near-equal
    decreases, whose order the two floating-point sums of the gradient may swap."""
    return FinetuneConfig(steps=steps, batch_size=4, lr=1e-2, checkpoint_every=2,
                          vstep=VStepConfig(strategy=strategy, lr=0.1, tau=0.5),
                          vstep_placement=placement.removesuffix("+shard"),
                          shard=placement.endswith("+shard"))


class DyingTeacher(TeacherLogits):
    """Teacher logits whose process exits hard on call number ``die_at`` (a killed rank)."""

    def __init__(self, *args, die_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.die_at = 0, die_at

    def __call__(self, index):
        self.calls += 1
        if self.calls == self.die_at:
            os._exit(17)
        return super().__call__(index)


def main(llama_dir: str, strategy: str, steps: int, out: str, checkpoint: str,
         die_rank: int, die_at: int, placement: str) -> None:
    ctx = DistributedContext.from_environment(timeout_s=30)
    student, teacher, ids = setup(Path(llama_dir), REPRESENTATION, n=8)
    teacher_logits = (DyingTeacher(teacher, ids, die_at=die_at) if ctx.rank == die_rank
                      else TeacherLogits(teacher, ids))
    result = finetune(student, teacher_logits, ids, config(strategy, steps, placement),
                      progress=False, dist=ctx,
                      checkpoint_dir=Path(checkpoint) if checkpoint else None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with full_parameters(student):  # whole on every rank when FSDP shards them
        state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(folder / f"rank{ctx.rank}.safetensors"))
    (folder / f"rank{ctx.rank}.json").write_text(json.dumps(
        {"losses": result.losses, "world_size": ctx.world_size,
         "code_bytes_sent": result.code_bytes_sent, "sharded": is_sharded(student)}))
    ctx.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5],
         int(sys.argv[6]), int(sys.argv[7]), sys.argv[8])
