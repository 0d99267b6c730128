"""The tensor path between a dense worker and its attention workers.

One channel per (dense worker, attention worker) pair: a torch.distributed
process group of two (rank 0 the dense worker, rank 1 the attention worker;
gloo on CPU, NCCL when both ends are CUDA), built from its own rendezvous
(a prefix of the dense worker's TCPStore) and never the process-wide default
group. So the loss of one peer breaks one channel: a killed peer is seen at
once (the connection closes), a frozen one after ``timeout`` seconds, and the
worker can join a new channel later (a restarted dense worker). Per step, the
dense worker sends each attention worker a header ``[command, length]`` and
an int64 layout (freed sequences, then its items); then per layer one packed
tensor ``[rows, (q_per_group + 2) * head_dim]`` (q, k, v of its items) goes out
and one ``[rows, q_per_group, head_dim]`` (attention output) comes back. A
worker with no items this step gets the layout and nothing per layer.

Live migration of a head group (hetis/engine/migration.py) uses two more
commands, sent before the step's header: ``EXPORT`` (layout ``[seq, group,
tokens, partial, blocks...]``; the worker answers the shape, then one ``[2, layers,
tokens, head_dim]`` tensor of K and V) and ``IMPORT`` (the same layout, then
that tensor, written into the given blocks). A KV move between two attention
workers passes through the dense worker: pulled from one channel, pushed
down the other.
Control (joining, stats) is gRPC; nothing here touches Redis.
"""
from __future__ import annotations

import datetime
import logging
import time

import torch
import torch.distributed as dist

from hetis.engine.step import AttnItem
from hetis.mesh.discovery import Residency
from hetis.model.attention import AttentionBackend

log = logging.getLogger("hetis.tensor_path")

CMD_STEP, CMD_PING, CMD_STOP, CMD_KEEPALIVE, CMD_EXPORT, CMD_IMPORT = 1, 2, 3, 4, 5, 6
# An idle channel carries a keepalive every KEEPALIVE seconds; the attention worker's end
# gives up on a channel silent for CHANNEL_TIMEOUT (its dense worker died or is cut off),
# so a channel never outlives its use on either side.
KEEPALIVE, CHANNEL_TIMEOUT = 5.0, 60.0
DENSE, ATTN = 0, 1  # ranks in a channel


def gloo_options(timeout: float, host: str | None) -> "dist.ProcessGroupGloo._Options":
    """Gloo options whose device binds ``host`` (the address this service advertises),
    so the peer connects to that address and never to whatever the machine's host name
    resolves to (often 127.0.0.1, or an interface the peer cannot reach)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if host
                     else dist.ProcessGroupGloo.create_default_device()]
    return opts


def open_channel(backend: str, store: dist.Store, group_id: str, rank: int,
                 timeout: float, host: str | None = None) -> dist.ProcessGroup:
    """The two-rank process group of one (dense, attention) pair; blocks until both ends
    are there. ``store`` is the dense worker's TCPStore (master there, client here);
    ``host``: the address this end advertises, which gloo binds (NCCL picks its own
    interface: ``NCCL_SOCKET_IFNAME``, docs/deploy.md)."""
    prefixed = dist.PrefixStore(f"hetis/{group_id}", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    if backend != "gloo":
        raise ValueError(f"backend: must be 'gloo' or 'nccl' (got {backend!r})")
    return dist.ProcessGroupGloo(prefixed, rank, 2, gloo_options(timeout, host))


def serve_store(port: int) -> dist.TCPStore:
    """The dense worker's rendezvous store (0: a free port); every channel is a prefix of it."""
    return dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=60))


def connect_store(host: str, port: int, timeout: float) -> dist.Store:
    """A client of the dense worker's TCPStore (the attention worker's side of a rendezvous)."""
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))


def encode_layout(items: list[AttnItem], freed=()) -> torch.Tensor:
    out = [len(freed), *freed, len(items)]
    for it in items:
        out += [it.seq_id, it.group, it.start, it.num_new, len(it.blocks), *it.blocks]
    return torch.tensor(out, dtype=torch.int64)


def decode_layout(t: torch.Tensor) -> tuple[list[AttnItem], list[int]]:
    v = t.tolist()
    nf = v[0]
    freed = v[1:1 + nf]
    i = 1 + nf
    n, i = v[i], i + 1
    items = []
    for _ in range(n):
        sid, g, start, new, nb = v[i:i + 5]
        items.append(AttnItem(sid, g, start, new, v[i + 5:i + 5 + nb]))
        i += 5 + nb
    return items, freed


class PeerLost(RuntimeError):
    """An attention worker's channel failed (it died, or did not answer in time)."""

    def __init__(self, peer: "RemoteAttention", cause: BaseException):
        self.peer = peer
        super().__init__(f"attention worker {peer.peer_id} lost: {type(cause).__name__}: "
                         f"{' '.join(str(cause).split())[:200]}")


def _guarded(method):
    """Any failure of a channel operation is this peer's loss (PeerLost names it)."""
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except PeerLost:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise PeerLost(self, e) from e
    return wrapper


class RemoteAttention:
    """An attention worker, seen from the dense worker (backend with send/recv).

    When another peer fails mid-step the executor carries the step to its end, so
    this channel stays in step for the next one (the step's outputs are discarded
    and its cache writes overwritten when the router re-runs those tokens).
    """

    remote = True

    def __init__(self, channel: dist.ProcessGroup, q_per_group: int, head_dim: int,
                 dtype: torch.dtype, comm_device: str = "cpu", compute_device: str = "cpu",
                 peer_id: str = ""):
        self.channel, self.qpg, self.D, self.dtype = channel, q_per_group, head_dim, dtype
        self.comm_device, self.compute_device = comm_device, compute_device
        self.peer_id = peer_id
        self.rows = self.sent = self.received = 0
        self._works: list = []
        self._keep: list[torch.Tensor] = []

    def _isend(self, t: torch.Tensor) -> None:
        t = t.to(self.comm_device).contiguous()
        self._keep.append(t)  # a buffer must outlive its send
        self._works.append(self.channel.send([t], ATTN, 0))

    @_guarded
    def begin_step(self, items: list[AttnItem], freed=()) -> None:
        layout = encode_layout(items, freed)
        self.rows = sum(it.num_new for it in items)
        self.sent = self.received = 0
        self._isend(torch.tensor([CMD_STEP, layout.numel()], dtype=torch.int64))
        self._isend(layout)

    @_guarded
    def send(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._isend(torch.cat([q.reshape(self.rows, -1), k, v], dim=1).to(self.dtype))
        self.sent += 1

    @_guarded
    def recv(self, layer: int) -> torch.Tensor:
        out = torch.empty(self.rows, self.qpg, self.D, dtype=self.dtype, device=self.comm_device)
        self.channel.recv([out], ATTN, 0).wait()
        self.received += 1
        return out.to(self.compute_device)

    @_guarded
    def end_step(self) -> None:
        for w in self._works:
            w.wait()
        self._works.clear()
        self._keep.clear()

    def _move_header(self, cmd: int, seq_id: int, group: int, blocks: list[int], n: int,
                     partial: bool = False) -> None:
        layout = torch.tensor([seq_id, group, n, int(partial), len(blocks), *blocks],
                              dtype=torch.int64, device=self.comm_device)
        self.channel.send([torch.tensor([cmd, layout.numel()], dtype=torch.int64,
                                        device=self.comm_device)], ATTN, 0).wait()
        self.channel.send([layout], ATTN, 0).wait()

    @_guarded
    def export_kv(self, seq_id: int, group: int, blocks: list[int], num_tokens: int,
                  partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A (sequence, group)'s cached K and V from this worker ([layers, tokens, D] each);
        the worker no longer counts it as resident (unless ``partial``: a pre-copy chunk)."""
        self._move_header(CMD_EXPORT, seq_id, group, blocks, num_tokens, partial)
        shape = torch.empty(4, dtype=torch.int64, device=self.comm_device)
        self.channel.recv([shape], ATTN, 0).wait()
        kv = torch.empty(shape.tolist(), dtype=self.dtype, device=self.comm_device)
        self.channel.recv([kv], ATTN, 0).wait()
        kv = kv.to(self.compute_device)
        return kv[0], kv[1]

    @_guarded
    def import_kv(self, seq_id: int, group: int, blocks: list[int], k: torch.Tensor,
                  v: torch.Tensor) -> None:
        """Write a (sequence, group)'s K and V ([layers, tokens, D]) into ``blocks`` here."""
        self._move_header(CMD_IMPORT, seq_id, group, blocks, k.shape[1])
        kv = torch.stack([k, v]).to(device=self.comm_device, dtype=self.dtype).contiguous()
        self.channel.send([kv], ATTN, 0).wait()

    @_guarded
    def ping(self, nbytes: int) -> float:
        """Round trip of ``nbytes`` through the worker, in seconds."""
        n = max(1, nbytes // 4)
        buf = torch.zeros(n, dtype=torch.float32, device=self.comm_device)
        t0 = time.perf_counter()
        self.channel.send([torch.tensor([CMD_PING, n], dtype=torch.int64, device=self.comm_device)],
                          ATTN, 0).wait()
        self.channel.send([buf], ATTN, 0).wait()
        self.channel.recv([buf], ATTN, 0).wait()
        return time.perf_counter() - t0

    def measure_link(self) -> tuple[float, float]:
        """(one-way latency s, bandwidth bytes/s) from small and large round trips."""
        small = min(self.ping(64) for _ in range(5))
        big_bytes = 4 << 20
        big = min(self.ping(big_bytes) for _ in range(3))
        bw = 2 * big_bytes / max(big - small, 1e-6)
        return small / 2, bw

    def stop(self) -> None:
        self.channel.send([torch.tensor([CMD_STOP, 0], dtype=torch.int64, device=self.comm_device)],
                          ATTN, 0).wait()

    @_guarded
    def keepalive(self) -> None:
        """Tell an idle worker we are here (call between steps)."""
        self.channel.send([torch.tensor([CMD_KEEPALIVE, 0], dtype=torch.int64,
                                        device=self.comm_device)], ATTN, 0).wait()


class AttentionLoop:
    """The attention worker's side: serve steps from rank 0 until told to stop.

    Also keeps what the worker holds and its measured cost, for telemetry:
    the per-token cost is refined from every step (EWMA of the time not
    explained by the per-group cost), so the dispatcher sees load changes.
    """

    def __init__(self, backend: AttentionBackend, channel: dist.ProcessGroup, num_layers: int,
                 cost: tuple[float, float], comm_device: str = "cpu", alpha: float = 0.1,
                 residency: Residency | None = None):
        self.backend, self.channel, self.L = backend, channel, num_layers
        self.comm_device = comm_device
        self.cost_per_token, self.cost_per_group = cost
        # shared by every channel of a worker (several dense workers write one store)
        self.residency = residency or Residency(backend.block_size)
        self.steps = 0
        self.last_seen = time.monotonic()  # when the dense worker last sent a command
        self.alpha = alpha
        self.attn_seconds = 0.0
        self.seqs: set[int] = set()  # sequences this channel wrote (dropped from residency at its end)

    def _recv(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.comm_device)
        self.channel.recv([t], DENSE, 0).wait()
        return t

    def _send(self, t: torch.Tensor) -> None:
        self.channel.send([t], DENSE, 0).wait()

    def run(self) -> None:
        be = self.backend
        qpg, D = be.qpg, be.head_dim
        dtype = be.store.dtype   # the wire carries the model's dtype, whatever the cache stores
        while True:
            cmd, n = self._recv(2, torch.int64).tolist()
            self.last_seen = time.monotonic()
            if cmd == CMD_STOP:
                return
            if cmd == CMD_KEEPALIVE:
                continue
            if cmd == CMD_PING:
                self._send(self._recv(n, torch.float32))
                continue
            if cmd in (CMD_EXPORT, CMD_IMPORT):
                self._move(cmd, self._recv(n, torch.int64).tolist(), dtype)
                continue
            items, freed = decode_layout(self._recv(n, torch.int64).cpu())
            self.residency.update(items, freed)
            self.seqs.difference_update(freed)
            self.seqs.update(it.seq_id for it in items)
            if not items:
                continue
            be.begin_step(items)
            rows = sum(it.num_new for it in items)
            spent = 0.0
            for layer in range(self.L):
                packed = self._recv((rows, (qpg + 2) * D), dtype).to(be.device)
                q, k, v = packed.split([qpg * D, D, D], dim=1)
                t0 = time.perf_counter()
                out = be.attend(layer, q.reshape(rows, qpg, D), k, v)
                spent += time.perf_counter() - t0
                self._send(out.to(self.comm_device).contiguous())
            self._learn(items, spent)

    def _move(self, cmd: int, layout: list[int], dtype: torch.dtype) -> None:
        """One head group's KV leaves (EXPORT) or arrives (IMPORT); module doc."""
        seq_id, group, n, partial, nb = layout[:5]
        blocks = layout[5:5 + nb]
        store = self.backend.store
        if cmd == CMD_EXPORT:
            k, v = store.export(blocks, n)
            kv = torch.stack([k, v]).to(self.comm_device).contiguous()
            self._send(torch.tensor(list(kv.shape), dtype=torch.int64, device=self.comm_device))
            self._send(kv)
            if not partial:
                self.residency.drop_group(seq_id, group)
            return
        kv = self._recv((2, self.L, n, self.backend.head_dim), dtype).to(self.backend.device)
        store.import_(blocks, kv[0], kv[1])
        self.residency.update([AttnItem(seq_id, group, 0, n, blocks)])
        self.seqs.add(seq_id)

    def _learn(self, items: list[AttnItem], seconds: float) -> None:
        self.steps += 1
        self.attn_seconds += seconds
        tokens = sum(it.start + it.num_new for it in items)
        per_layer = seconds / self.L
        est = max(per_layer - self.cost_per_group * len(items), 0.0) / max(tokens, 1)
        self.cost_per_token = (1 - self.alpha) * self.cost_per_token + self.alpha * est
