"""Data-parallel scoring: under `torchrun`, every process scores its share of the calibration sequences.

Ḡ is a plain weighted sum over sequences, so each rank sums the gradients of its own sequences (every
rank-th one) and one all-reduce per pass adds the ranks' fp32 sums. All ranks then hold the same Ḡ, compute
the same scores and remove the same structures; rank 0 alone writes progress and the artifact. Launch:

    torchrun --nproc-per-node 8 -m gisp_deploy.cli prune ./Llama-3-8B --calib c4/ --out llama3-gisp
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from ..data import Calibration


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes (one process: rank 0 of 1, nothing shared)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """The ranks torchrun announces in the environment (WORLD_SIZE, RANK, LOCAL_RANK), else one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def start(self, device: torch.device, timeout_min: float = 60) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPU processes (tests)."""
        if self.world == 1 or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_min))

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: cuda:LOCAL_RANK when CUDA is asked for."""
        if self.world > 1 and requested.type == "cuda":
            if requested.index not in (None, self.local_rank):
                raise ValueError(f"--device {requested} under torchrun: each process takes cuda:LOCAL_RANK; pass "
                                 "--device cuda")
            return torch.device("cuda", self.local_rank)
        return requested

    def shard(self, calib: Calibration) -> Calibration:
        """Every world-th sequence starting at this rank; the weights keep their global values (1/N...)."""
        if self.world == 1:
            return calib
        return calib.select(slice(self.rank, None, self.world))

    def sum(self, tensors) -> None:
        """Add each tensor over all ranks, in place."""
        if self.world == 1:
            return
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
