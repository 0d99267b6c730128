"""A dense worker as K tensor-parallel ranks (``--tp K``): one process per rank.

Rank 0 is the dense worker the router talks to (gRPC, Redis). At start it
opens its rendezvous TCPStore and starts ranks 1..K-1 as child processes
(``python -m hetis.mesh.tp``, its config in the environment); each loads the
model, shards it (hetis/model/tp.py) and joins two process groups of K ranks
over that store: ``control`` (gloo, CPU: commands and agreements) and
``data`` (the all-reduces of the model: NCCL when the device is CUDA, gloo
otherwise). On a CUDA device ``cuda:N``, rank r uses ``cuda:N+r``.

Rank 0 drives the others with commands broadcast on ``control``: ``step``
(every rank runs the step for its own head groups: their attention on its own
KV or over its own channel to the attention worker holding them; the
all-reduces keep the ranks in step), ``connect`` (every rank joins the same
attention workers into the same backend slots, each with a channel of its
own) and ``stop``. After a step or a connect the ranks agree (an all-reduce):
a backend lost or not joined on any rank is dropped on all of them, so their
backend lists never differ. A rank whose process dies breaks the groups:
rank 0 then exits (its instance is lost; the router recomputes its requests on
the other instances), and the other ranks exit when the groups break.
"""
from __future__ import annotations

import base64
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

log = logging.getLogger("hetis.tp")
CONFIG_ENV = "HETIS_TP_CONFIG"

try:  # loaded before any fork: dlopen in a forked child is not safe
    import ctypes
    _LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


def _die_with_rank0():  # in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a rank never outlives rank 0


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank`` when rank 0 is on ``device`` (cuda:N -> cuda:N+rank)."""
    if device.startswith("cuda"):
        base = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{base + rank}"
    return device


class TPBroken(RuntimeError):
    """A collective of the tensor-parallel group failed: a rank is gone. Rank 0 exits."""


def _guard(fn):
    def wrapper(*args):
        try:
            return fn(*args)
        except TPBroken:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise TPBroken(f"tensor-parallel group broken: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from e
    return wrapper


class TPGroup:
    """The K ranks of one dense worker: a control group and a data group."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: str,
                 timeout: float = 600.0, host: str | None = None):
        from hetis.mesh.tensor_path import gloo_options
        td = datetime.timedelta(seconds=timeout)
        self.rank, self.world = rank, world
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("hetis/tp/control", store), rank,
                                             world, gloo_options(timeout, host))
        if device.startswith("cuda"):
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("hetis/tp/data", store), rank,
                                              world, opts)
        else:
            self.data = dist.ProcessGroupGloo(dist.PrefixStore("hetis/tp/data", store), rank,
                                              world, gloo_options(timeout, host))

    @_guard
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (the model's O projection and MLP)."""
        self.data.allreduce([t]).wait()
        return t

    @_guard
    def broadcast(self, obj=None):
        """Rank 0's ``obj``, on every rank (pickled over the control group)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.control.broadcast([size], opts).wait()
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.control.broadcast([data], opts).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    @_guard
    def any_of(self, flags: list[bool]) -> list[bool]:
        """Per position: set on any rank."""
        if not flags:
            return []
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.control.allreduce([t], opts).wait()
        return [bool(v) for v in t.tolist()]


def spawn_ranks(cfg, store_host: str, store_port: int) -> list[subprocess.Popen]:
    """Start ranks 1..tp-1 of the dense worker ``cfg`` (rank 0's) as child processes."""
    procs = []
    for r in range(1, cfg.tp):
        rc = replace(cfg, tp_rank=r, tp_store=f"{store_host}:{store_port}",
                     device=rank_device(cfg.device, r), metrics_port=None)
        env = dict(os.environ, **{CONFIG_ENV: base64.b64encode(pickle.dumps(rc)).decode()})
        procs.append(subprocess.Popen([sys.executable, "-m", "hetis.mesh.tp"], env=env,
                                      stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_rank0 if _LIBC else None))
    return procs


def follow(cfg) -> None:
    """Rank r >= 1: build the worker, then serve rank 0's commands until ``stop``."""
    from hetis.mesh.dense_worker import DenseWorker
    worker = DenseWorker(cfg)
    log.info("tensor-parallel rank %d of %d ready (groups %s)", cfg.tp_rank, cfg.tp,
             list(worker.executor.groups))
    from hetis.mesh.dense_worker import BackendsLost
    try:
        while True:
            cmd = worker.tp.broadcast()
            try:
                if cmd[0] == "step":
                    worker.run_step(cmd[1])
                elif cmd[0] == "connect":
                    worker.apply_connect(cmd[1], cmd[2])
                elif cmd[0] == "stop":
                    break
            except (BackendsLost, ValueError) as e:  # agreed by every rank: rank 0 reports it
                log.info("tensor-parallel rank %d: %s", cfg.tp_rank, e)
    except Exception as e:  # noqa: BLE001 - the group is broken (rank 0 gone): so are we
        log.error("tensor-parallel rank %d stops: %s", cfg.tp_rank, e)
    finally:
        worker.close()


def main() -> None:
    cfg = pickle.loads(base64.b64decode(os.environ.pop(CONFIG_ENV)))
    from hetis.mesh.flags import apply_threads
    from hetis.mesh.service import setup_logging
    setup_logging(cfg.log_level)
    apply_threads(cfg.threads)
    follow(cfg)


if __name__ == "__main__":
    main()
