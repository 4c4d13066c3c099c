"""Many training processes over one set of identities: the launchers' environments, a lock per identity
in the output root, and a watch on the launcher.

    torchrun --standalone --nproc_per_node 4 -m lora_w2w.train_identities ...          # 4 processes on a CPU
    accelerate launch --multi_gpu --num_processes 8 -m lora_w2w.train_identities ...   # 8 GPUs
    for r in 0 1 2 3; do w2w train-identities ... --shard $r/4 & done; wait            # 4 processes, no launcher

torchrun and accelerate's multi-GPU launcher (which runs torchrun) give each process WORLD_SIZE, RANK and
LOCAL_RANK. accelerate turns those into a world of several processes only with CUDA or its CPU backend,
so a process launched without CUDA asks for the CPU backend (`uses_cpu_backend`). `accelerate launch
--cpu --num_processes N` starts one process whatever N is; it sets MASTER_ADDR for N > 1, which is how
`world_warning` tells it apart from a single-process launch.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

LOCKS_FOLDER = ".locks"  # in the output root; `w2w collect` passes over dot-folders

# every process that `torchrun` (and accelerate's multi-GPU launcher) starts has TORCHELASTIC_RUN_ID;
# every process that `accelerate launch` starts has ACCELERATE_MIXED_PRECISION (accelerate/utils/launch.py)
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")

CPU_COMMANDS = ("torchrun --standalone --nproc_per_node N -m lora_w2w.train_identities ..., or N processes of "
                "`w2w train-identities ... --shard R/N`")


def launched_world(env: Mapping[str, str] = os.environ) -> int:
    """The number of processes a launcher started together (WORLD_SIZE; 1 without one)."""
    return int(env.get("WORLD_SIZE", "1") or 1)


def uses_cpu_backend(env: Mapping[str, str] = os.environ, cuda: bool = False) -> bool:
    """Whether accelerate should take its CPU backend (gloo): several processes launched together and no CUDA.
    Without it accelerate gives each process a world of 1 (accelerate/state.py `_prepare_backend`: the
    MULTI_CPU route needs `cpu`), and every process would train every identity."""
    return launched_world(env) > 1 and not cuda


def world_warning(num_processes: int, env: Mapping[str, str] = os.environ) -> str | None:
    """What to tell a process to which accelerate gave a world of `num_processes` = 1 while its launcher was
    asked for more; None when the world is what was asked."""
    if num_processes > 1:
        return None
    if launched_world(env) > 1:
        return (f"the launcher started {launched_world(env)} processes but accelerate gave this one a world of 1: "
                f"each would train every identity (give the processes GPUs, or ACCELERATE_USE_CPU=true)")
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env:
        return ("`accelerate launch --num_processes N` without --multi_gpu starts one process, which trains every "
                f"identity; on a CPU start N processes with {CPU_COMMANDS}")
    return None


class LauncherWatch:
    """The process that launched this one (torchrun, accelerate launch), when a launcher did: `gone` turns
    true once it has died and this process was handed to another parent. A process started otherwise (a
    shell, `nohup`, `--shard` loops) has no launcher to outlive."""

    def __init__(self, env: Mapping[str, str] = os.environ):
        self.pid = os.getppid() if any(name in env for name in LAUNCHER_VARIABLES) else None

    @property
    def gone(self) -> bool:
        return self.pid is not None and os.getppid() != self.pid


class IdentityLocks:
    """One lock per identity, `<output-root>/.locks/<name>.lock` (an OS file lock through filelock: the
    system releases it when its process dies), so that processes sharing an output root never train the
    same identity: each trains the identities it claims and passes over those another holds."""

    def __init__(self, output_root: str | os.PathLike):
        self.folder = Path(output_root) / LOCKS_FOLDER
        self.held = {}

    def claim(self, name: str) -> bool:
        """Take the lock of identity `name` if no other process holds it; whether this process now holds it."""
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder / f"{name}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self.held[name] = lock
        return True

    def release(self, names: list[str]) -> None:
        """Let go of the locks of `names`."""
        for name in names:
            self.held.pop(name).release()

    def claim_group(self, pending: Iterator[Path], size: int, finished) -> tuple[list[Path], int]:
        """Up to `size` identity folders from `pending` that this process now holds and `finished(name)` says
        are still to train, and how many folders it passed over (held by another process, or finished by one
        since `pending` was made)."""
        group, passed = [], 0
        for folder in pending:
            if not self.claim(folder.name):
                passed += 1
            elif finished(folder.name):
                self.release([folder.name])
                passed += 1
            else:
                group.append(folder)
                if len(group) == size:
                    break
        return group, passed
