"""Process-group setup and rank helpers. Model code never imports this module.

Works under `deepspeed`, `torchrun` and a plain `python` process: with no launcher the harness becomes
a world of one (RANK=0, WORLD_SIZE=1, a free local port) so the same code path runs everywhere.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> None:
    """Give the process the variables a launcher (deepspeed, torchrun) would have set.

    - `srun` with one task per GPU (no launcher in between): rank, local rank and world size come from
      SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS; MASTER_ADDR/PORT must be exported by the
      batch script (slurm/launch.sh does). Only inside an srun step: a plain `python` in the batch
      shell of a multi-task job is still a world of one.
    - a plain `python` process: a world of one on a free local port.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"srun started {os.environ['SLURM_STEP_NUM_TASKS']} tasks but {' and '.join(missing)} "
                               "is not set: export them in the batch script (see slurm/launch.sh)")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                          WORLD_SIZE=os.environ["SLURM_STEP_NUM_TASKS"])
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed on plain gloo for CPU runs instead of its shared-memory allreduce extension.

    On a CPU-only machine DeepSpeed (0.19) JIT-compiles `deepspeed_shm_comm` the first time any process
    initialises (~100 s, under a file lock that a killed build leaves behind), and every job then
    creates two 69 MB buffers per rank in /dev/shm that are never removed: a laptop or CI box running
    the test suite fills /dev/shm (RAM) by gigabytes, and where /dev/shm is small (64 MB container
    default) the first job dies with SIGBUS. Gloo over loopback is fast enough for CPU jobs; set
    HARNESS_CPU_SHM_ALLREDUCE=1 to use the extension anyway. GPU runs never reach this op.
    """
    if os.environ.get("HARNESS_CPU_SHM_ALLREDUCE", "0") == "1":
        return
    import deepspeed.ops

    # deepspeed.comm.torch.build_shm_op() returns None for an op marked incompatible here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    launcher_env()
    # Fail with a stack trace instead of hanging forever when one rank dies inside a collective.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 calls collectives that torch 2.13 renamed, once per step; the warning is not
    # actionable by users and buries the log. (Filter set after the import, which resets filters.)
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)

    local_rank = int(os.environ["LOCAL_RANK"])
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        skip_cpu_shm_allreduce()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=acc.communication_backend_name(),
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    return DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Every rank arrives (so none tears its connections down while a peer still works, e.g. rank 0
    writing the memory report), then the process groups are destroyed."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End the process without interpreter finalisation, once every output is written and flushed.

    After destroy_process_group, ZeRO-3 still holds the gloo/NCCL process groups from every
    partitioned parameter (`param.ds_process_group`) and from its module-level state, so their C++
    objects and worker threads live until the interpreter tears its modules down. That teardown runs in
    no fixed order and, rarely, aborts the process ("terminate called without an active exception",
    SIGABRT) after training has succeeded: a finished job would then be reported as a crash. Callers
    close their own files (metrics, wandb) first; here only the standard streams are left to flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
