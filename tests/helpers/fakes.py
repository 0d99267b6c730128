"""Stand-ins for the data plane, so the control plane is tested without a model (as vLLM's
scheduler tests): a tokenizer that spells token ids, an executor that answers at once."""
from __future__ import annotations

import string
import time

from hetis.engine.config import EngineConfig
from hetis.engine.dispatcher import Device
from hetis.engine.engine import Engine, build_engine
from hetis.engine.step import Step, StepTimes
from hetis.model.config import ModelConfig

VOCAB = 64
EOS = 63
# 3 KV-head groups, as SmolLM2: placement spreads over up to 3 devices
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_layers=2,
                    num_heads=6, num_kv_heads=3, head_dim=4, eos_token_ids=(EOS,))


class FakeTokenizer:
    """Token i is the letter string.ascii_letters[i % 52]; EOS ends a sequence."""
    vocab_size = VOCAB
    eos_token_ids = (EOS,)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(string.ascii_letters[i % 52] for i in ids if i != EOS)

    def encode(self, text: str) -> list[int]:
        return [string.ascii_letters.index(c) for c in text]


class FakeExecutor:
    """Samples ``next_token(seq_id, position)`` for every chunk that samples; records the steps
    (KV moves too: there is no KV to copy)."""

    supports_moves = True

    def __init__(self, next_token=lambda seq_id, pos: (pos + 1) % 50, delay: float = 0.0):
        self.next_token, self.delay = next_token, delay
        self.steps: list[Step] = []
        self.last_times = StepTimes()

    def execute(self, step: Step) -> list[int]:
        self.steps.append(step)
        if self.delay:
            time.sleep(self.delay)
        return [self.next_token(c.seq_id, c.start + len(c.token_ids)) for c in step.chunks if c.sample]


def fake_engine(devices: int = 1, blocks: int = 1000, policy: str = "hetis", pinned=None,
                executor=None, **cfg) -> Engine:
    ecfg = EngineConfig(**{"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64,
                           "max_model_len": 256, **cfg})
    devs = [Device(f"d{i}", blocks, remote=i > 0) for i in range(devices)]
    return build_engine(executor or FakeExecutor(), FakeTokenizer(), MODEL, ecfg, devs,
                        policy=policy, pinned=pinned)
