"""Runs one step of the model: the dense half here, attention on the backends.

Backend 0..N-1 each hold some head groups of some sequences (the placement).
Per layer, the q/k/v of every backend's items are gathered into one packed
tensor (item-major), handed to the backend, and the outputs scattered back.
Remote backends (``remote = True``: ``send``/``recv``) are sent to first, so
their work overlaps the local backends' compute. The executor also samples:
in the mesh it runs in the dense worker, which returns token ids, not logits.

Every tensor a step makes is made on the model's device (the step's lists
arrive as Python values); tests/model/test_meta_device.py runs a step with
everything on ``device="meta"`` to keep it so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hetis.engine.step import AttnItem, Step, StepTimes
from hetis.model.dense import DenseModel
from hetis.model.sampler import sample


class RemoteFailed(RuntimeError):
    """Remote backends failed during a step (``failed``: backend index -> its error).

    The step was carried to its end without them (their rows zeros), so every other
    channel stayed in step and every collective of a tensor-parallel group was met."""

    def __init__(self, failed: dict[int, BaseException]):
        self.failed = failed
        super().__init__("; ".join(str(e) for e in failed.values()))


@dataclass
class _Index:
    rows: torch.Tensor   # token row of each packed row
    grp: torch.Tensor    # head group of each packed row
    # the packed rows are every (token, group) in the step's own order (one backend
    # with all of a decode step): q/k/v and the output pass as views, not index copies
    whole: bool = field(default=False)


class Executor:
    """``groups``: the head groups this executor computes (a tensor-parallel rank's share,
    hetis/model/tp.py; default all): items of other groups are not its business, and its
    model's q/k/v hold only these groups, in order."""

    supports_moves = True  # copies migrating head groups' KV (hetis/engine/migration.py)
    on_compute_thread = True  # the serving loop steps it on hetis/model/compute.py's thread

    def __init__(self, model: DenseModel, backends: list, groups: range | None = None):
        self.model, self.backends = model, backends
        c = model.cfg
        self.partial = groups is not None
        self.groups = groups if groups is not None else range(c.num_groups)
        self.G, self.qpg, self.D = len(self.groups), c.q_per_group, c.head_dim
        self.device = model.device
        self.last_times = StepTimes()

    def _index(self, items: list[AttnItem], offsets: dict[int, int], total: int) -> _Index:
        # built on the CPU from Python lists (cheap integer work), moved once per step
        n = torch.tensor([it.num_new for it in items])
        first = torch.tensor([offsets[it.seq_id] for it in items])
        base = torch.cumsum(n, 0) - n
        item_of_row = torch.repeat_interleave(torch.arange(len(items)), n)
        rows = first[item_of_row] + torch.arange(int(n.sum())) - base[item_of_row]
        grp = torch.tensor([it.group - self.groups.start for it in items])[item_of_row]
        whole = len(rows) == total * self.G and torch.equal(
            rows, torch.arange(total).repeat_interleave(self.G)) and torch.equal(
            grp, torch.arange(self.G).repeat(total))
        return _Index(rows.to(self.device), grp.to(self.device), whole)

    def execute(self, step: Step) -> list[int]:
        """Run the step; return one sampled token per chunk with ``sample``, in order."""
        t0 = time.perf_counter()
        logits = self.forward(step)
        sampled = [c for c in step.chunks if c.sample]
        toks = sample(logits, [c.params for c in sampled],
                      [c.start + len(c.token_ids) for c in sampled]) if sampled else []
        self.last_times.total = time.perf_counter() - t0
        return toks

    def _move(self, moves, remote) -> None:
        """Copy migrating head groups' KV between backends, before the step's attention
        (hetis/engine/migration.py): in-process stores directly; a remote backend's KV is
        pulled over its tensor channel and pushed down the destination's. ``remote(b, op,
        *args)`` runs a remote backend's op, None once that backend failed: a move from a
        failed source is not written anywhere (the step fails and the router recomputes)."""
        for m in moves:
            if m.group not in self.groups:
                continue  # another tensor-parallel rank's group
            src, dst = self.backends[m.src], self.backends[m.dst]
            if getattr(src, "remote", False):
                kv = remote(m.src, src.export_kv, m.seq_id, m.group, m.src_blocks, m.num_tokens,
                            m.partial)
            else:
                kv = src.store.export(m.src_blocks, m.num_tokens)
            if kv is None:
                continue
            if getattr(dst, "remote", False):
                remote(m.dst, dst.import_kv, m.seq_id, m.group, m.dst_blocks, *kv)
            else:
                dst.store.import_(m.dst_blocks, *kv)

    def forward(self, step: Step) -> torch.Tensor:
        """Run the step; float32 logits of the chunks with ``sample``, in order. A remote
        backend that fails is left out for the rest of the step, which still runs to its
        end; then RemoteFailed names every failed backend."""
        chunks, items, freed = step.chunks, step.work, step.freed
        if self.partial:  # a TP rank's share
            items = [[it for it in its if it.group in self.groups] for its in items]
        failed: dict[int, BaseException] = {}

        def remote(b, op, *args):
            if b in failed:
                return None
            try:
                return op(*args)
            except Exception as e:  # noqa: BLE001 - remote backends raise only their loss
                failed[b] = e
                return None
        tm = time.perf_counter()
        self._move(step.moves, remote)
        moved = time.perf_counter() - tm
        if not chunks:  # nothing to compute: only tell remote workers what was freed
            for b, be in enumerate(self.backends):
                if getattr(be, "remote", False):
                    remote(b, be.begin_step, [], freed)
                    remote(b, be.end_step)
            self.last_times = StepTimes(move=moved)
            if failed:
                raise RemoteFailed(failed)
            return torch.empty(0, self.model.cfg.vocab_size, device=self.device)
        times = StepTimes(move=moved)
        ids, pos, offsets, logit_rows = [], [], {}, []
        t = 0
        for c in chunks:
            offsets[c.seq_id] = t
            ids.extend(c.token_ids)
            pos.extend(range(c.start, c.start + len(c.token_ids)))
            t += len(c.token_ids)
            if c.sample:
                logit_rows.append(t - 1)
        index: list[_Index | None] = []
        for b, its in enumerate(items):
            be = self.backends[b]
            if getattr(be, "remote", False):
                remote(b, be.begin_step, its, freed)   # the layout goes once per step, even when empty
            elif its:
                be.begin_step(its)
            index.append(self._index(its, offsets, t) if its else None)
        order = sorted(range(len(items)), key=lambda b: not getattr(self.backends[b], "remote", False))
        G, qpg, D = self.G, self.qpg, self.D

        def attend(layer, q, k, v):
            T = q.shape[0]
            q4 = q.view(T, G, qpg, D)
            out = None   # allocated unless one local backend returns the whole output
            pending = []
            for b in order:
                ix = index[b]
                if ix is None:
                    continue
                be = self.backends[b]
                if ix.whole and not getattr(be, "remote", False):
                    ta = time.perf_counter()
                    o = be.attend(layer, q4.view(T * G, qpg, D), k.reshape(T * G, D), v.reshape(T * G, D))
                    times.local_attn += time.perf_counter() - ta
                    o = o.view(T, G * qpg, D)
                    return o if o.dtype == q.dtype else o.to(q.dtype)
                if out is None:
                    out = torch.zeros_like(q4) if failed else torch.empty_like(q4)
                if getattr(be, "remote", False):
                    remote(b, be.send, layer, q4[ix.rows, ix.grp], k[ix.rows, ix.grp], v[ix.rows, ix.grp])
                    pending.append(b)
                else:
                    ta = time.perf_counter()
                    out[ix.rows, ix.grp] = be.attend(layer, q4[ix.rows, ix.grp], k[ix.rows, ix.grp],
                                                     v[ix.rows, ix.grp]).to(out.dtype)
                    times.local_attn += time.perf_counter() - ta
            for b in pending:
                ix = index[b]
                tw = time.perf_counter()
                got = remote(b, self.backends[b].recv, layer)
                if got is not None:
                    out[ix.rows, ix.grp] = got.to(out.dtype)
                else:  # failed now or before: zeros, the step's result is void anyway
                    out[ix.rows, ix.grp] = 0
                times.exchange_wait += time.perf_counter() - tw
            if out is None:   # no backend had rows of this step (nothing to attend)
                out = torch.zeros_like(q4)
            return out.view(T, G * qpg, D)

        long = dict(dtype=torch.long, device=self.device)
        logits = self.model.forward(torch.tensor(ids, **long), torch.tensor(pos, **long),
                                    torch.tensor(logit_rows, **long), attend)
        for b, be in enumerate(self.backends):
            if getattr(be, "remote", False):
                remote(b, be.end_step)
        self.last_times = times
        if failed:
            raise RemoteFailed(failed)
        return logits
