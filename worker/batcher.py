"""The inference stage: one per worker process, merging items from concurrent tasks into batches.

Like Triton's dynamic batcher: a request waits at most ``max_wait_s`` for others to join, and a forward
pass takes at most ``max_batch`` items. Requests are only merged when they use the same model object, so a
batch never mixes model versions even while a new champion is being rolled in.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from model.classifier import Classifier, Prediction
from worker import metrics


@dataclass
class _Request:
    model: Classifier
    tensors: torch.Tensor
    k: int
    future: Future[list[Prediction]] = field(default_factory=Future)


class Batcher:
    """``runners`` threads each collect a batch from the shared queue and run it, so on CPU two forward passes
    with one torch thread each can use two cores without torch's intra-op barrier coupling them."""

    def __init__(self, *, max_batch: int, max_wait_s: float, runners: int = 1) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name="imgq-batcher", daemon=True)
                         for _ in range(max(1, runners))]
        for thread in self._threads:
            thread.start()

    def predict(self, model: Classifier, tensors: Sequence[torch.Tensor], k: int) -> list[Prediction]:
        """Blocks until this request's rows have been through the model."""
        if not tensors:
            return []
        request = _Request(model, torch.stack(list(tensors)), k)
        self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)  # each runner takes one and stops
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        held: list[_Request] = []  # requests for another model, run in the next round
        closing = False
        while True:
            first = held.pop(0) if held else (None if closing else self._queue.get())
            if first is None:
                return
            group, rows = [first], len(first.tensors)
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch and not closing:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    closing = True
                elif nxt.model is first.model and nxt.k == first.k:
                    group.append(nxt)
                    rows += len(nxt.tensors)
                else:
                    held.append(nxt)
            self._run_group(group)

    def _run_group(self, group: list[_Request]) -> None:
        model, k = group[0].model, group[0].k
        try:
            batch = torch.cat([r.tensors for r in group]) if len(group) > 1 else group[0].tensors
            preds: list[Prediction] = []
            for start in range(0, len(batch), self.max_batch):
                preds += model.predict(batch[start:start + self.max_batch], k=k)
                metrics.observe_forward_batch(min(self.max_batch, len(batch) - start))
        except BaseException as exc:  # hand the failure to every waiting task, keep the stage alive
            for r in group:
                r.future.set_exception(exc)
            return
        offset = 0
        for r in group:
            r.future.set_result(preds[offset:offset + len(r.tensors)])
            offset += len(r.tensors)

