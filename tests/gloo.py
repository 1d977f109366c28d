"""Two CPU ranks (gloo) in one test: a free port for their rendezvous, and each spawned
rank's process group."""

import contextlib
import os
import socket

import torch

from switch_dit import distributed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_rank(rank: int, world: int, port: int):
    """Rank ``rank`` of ``world`` in a process group on the CPU at 127.0.0.1:``port``, with one
    torch thread (the ranks share the cores); yields distributed.setup's context and cleans the
    group up after, also on a failure."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    try:
        yield ctx
    finally:
        distributed.cleanup()
