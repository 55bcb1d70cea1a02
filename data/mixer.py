"""Token mixer: a shuffle buffer over tokens from many images.

Tokens of one image are highly correlated (neighbouring patches, shared background), so an SAE
batch drawn straight from a few images is a biased sample. The mixer holds ``capacity`` tokens
from many images; whenever it is at most half full it is topped up to capacity and shuffled in
place, and batches are cut from the shuffled buffer. Each batch therefore mixes tokens from
about ``capacity / tokens_per_image`` images at a cost of one permutation per ``capacity / 2``
tokens served. Tokens are held in the dtype they arrive in (an fp16 activation cache's rows
stay fp16: half the memory and half the shuffle's traffic) and batches are served as float32,
which is exact for fp16 and bf16. The permutation is gathered into a second buffer of the
same size, which then becomes the buffer: no temporary as large as the buffer is allocated per
top-up (on a CPU a fresh 200 MB tensor costs more in page faults than the gather itself).

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
        self._spare_ND: Tensor | None = None  # the permutation's destination
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
            self._shuffle(torch.randperm(self.count, generator=self.generator))
        assert self.buffer_ND is not None  # at least half full here
        self.count -= n
        return self.buffer_ND[self.count : self.count + n].to(torch.float32, copy=True)

    def _shuffle(self, perm: Tensor) -> None:
        buffer = self.buffer_ND
        assert buffer is not None  # produce() filled it
        spare = self._spare_ND
        if spare is None or spare.shape != buffer.shape or spare.device != buffer.device:
            spare = torch.empty_like(buffer)
        torch.index_select(buffer[: self.count], 0, perm.to(buffer.device), out=spare[: self.count])
        self.buffer_ND, self._spare_ND = spare, buffer

    def state_dict(self) -> dict:
        tokens = None if self.buffer_ND is None else self.buffer_ND[: self.count].cpu().clone()
        return {"tokens": tokens, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.generator.set_state(state["generator"])
        self.buffer_ND, self._spare_ND, self.count = None, None, 0
        if state["tokens"] is not None:
            self._append(state["tokens"].to(device))
