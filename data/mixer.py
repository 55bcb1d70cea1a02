"""Token mixer: a shuffle buffer over tokens from many images.

Tokens of one image are highly correlated (neighbouring patches, shared background), so an SAE
batch drawn straight from a few images is a biased sample. The mixer holds ``capacity`` tokens
from many images; whenever it is at most half full it is topped up to capacity and shuffled in
place, and batches are cut from the shuffled buffer. Each batch therefore mixes tokens from
about ``capacity / tokens_per_image`` images at a cost of one permutation per ``capacity / 2``
tokens served.

Shape legend: N tokens, D model width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class TokenMixer:
    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.buffer_ND: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def _append(self, tokens_ND: Tensor) -> None:
        n = tokens_ND.shape[0]
        if self.buffer_ND is None:
            self.buffer_ND = tokens_ND.new_empty(self.capacity + n, tokens_ND.shape[1])
        elif self.count + n > self.buffer_ND.shape[0]:
            grown = self.buffer_ND.new_empty(self.count + n, self.buffer_ND.shape[1])
            grown[: self.count] = self.buffer_ND[: self.count]
            self.buffer_ND = grown
        self.buffer_ND[self.count : self.count + n] = tokens_ND
        self.count += n

    def next_batch(self, n: int, produce: Callable[[], Tensor]) -> Tensor:
        """``[n, D]`` tokens; ``produce()`` returns the tokens of the next images when the
        buffer needs topping up."""
        if n > self.capacity // 2:
            raise ValueError(
                f"a batch of {n} tokens needs data.mix_buffer_tokens >= {2 * n} "
                f"(it is {self.capacity}); raise it or lower the batch size"
            )
        if self.count < self.capacity // 2:
            while self.count < self.capacity:
                self._append(produce())
            perm = torch.randperm(self.count, generator=self.generator)
            assert self.buffer_ND is not None  # produce() filled it
            live = self.buffer_ND[: self.count]
            live.copy_(live[perm.to(live.device)])
        assert self.buffer_ND is not None  # at least half full here
        self.count -= n
        return self.buffer_ND[self.count : self.count + n].clone()

    def state_dict(self) -> dict:
        tokens = None if self.buffer_ND is None else self.buffer_ND[: self.count].cpu().clone()
        return {"tokens": tokens, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.generator.set_state(state["generator"])
        self.buffer_ND, self.count = None, 0
        if state["tokens"] is not None:
            self._append(state["tokens"].to(device))
