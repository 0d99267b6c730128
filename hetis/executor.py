"""Runs one step of the model: the dense half here, attention on the backends.

Backend 0..N-1 each hold some head groups of some sequences (the placement).
Per layer, the q/k/v of every backend's items are gathered into one packed
tensor (item-major), handed to the backend, and the outputs scattered back.
Remote backends (``remote = True``: ``send``/``recv``) are sent to first, so
their work overlaps the local backends' compute.
"""
from __future__ import annotations

import torch

from hetis.attention import AttnItem
from hetis.model import DenseModel
from hetis.scheduler import Chunk


class Executor:
    def __init__(self, model: DenseModel, backends: list):
        self.model, self.backends = model, backends
        c = model.cfg
        self.G, self.qpg, self.D = c.num_groups, c.q_per_group, c.head_dim

    def execute(self, chunks: list[Chunk], items: list[list[AttnItem]]) -> torch.Tensor:
        """Float32 logits [len(sampled chunks), vocab] for the chunks with ``sample``."""
        ids, pos, offsets, logit_rows = [], [], {}, []
        t = 0
        for c in chunks:
            offsets[c.seq.seq_id] = t
            ids.extend(c.seq.tokens(c.start, c.start + c.num_new))
            pos.extend(range(c.start, c.start + c.num_new))
            t += c.num_new
            if c.sample:
                logit_rows.append(t - 1)
        index = []  # per backend: (token rows, groups) of its packed rows
        for b, its in enumerate(items):
            if not its:
                index.append(None)
                continue
            n = torch.tensor([it.num_new for it in its])
            first = torch.tensor([offsets[it.seq_id] for it in its])
            base = torch.cumsum(n, 0) - n
            item_of_row = torch.repeat_interleave(torch.arange(len(its)), n)
            rows = first[item_of_row] + torch.arange(int(n.sum())) - base[item_of_row]
            grp = torch.tensor([it.group for it in its])[item_of_row]
            index.append((rows, grp))
            self.backends[b].begin_step(its)
        order = sorted(range(len(items)), key=lambda b: not getattr(self.backends[b], "remote", False))
        G, qpg, D = self.G, self.qpg, self.D

        def attend(layer, q, k, v):
            T = q.shape[0]
            q4 = q.view(T, G, qpg, D)
            out = torch.empty_like(q4)
            pending = []
            for b in order:
                if index[b] is None:
                    continue
                rows, grp = index[b]
                be = self.backends[b]
                if getattr(be, "remote", False):
                    be.send(layer, q4[rows, grp], k[rows, grp], v[rows, grp])
                    pending.append(b)
                else:
                    out[rows, grp] = be.attend(layer, q4[rows, grp], k[rows, grp], v[rows, grp])
            for b in pending:
                rows, grp = index[b]
                out[rows, grp] = self.backends[b].recv(layer)
            return out.view(T, G * qpg, D)

        return self.model.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(logit_rows),
                                  attend)
