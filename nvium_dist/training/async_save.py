"""training.async_save: checkpoints written in a background thread while training goes on.

The training step blocks only while `checkpoint.save_checkpoint` copies this rank's state to host memory
(its share of the layout-independent files and DeepSpeed's state dicts, nothing gathered); writing,
hashing, the manifest, the rename and `latest` then run in one thread per rank, whose collectives use a
gloo process group of their own, so they never interleave with the step's. At most one save is in flight:
the next save, the end of training, a preemption and an error all wait for it. A save that failed (on any
rank: the ranks agree on it) is raised on every rank at the next step's stop check
(trainer._any_rank_stopping). A kill during the background write leaves only `.tmp_step_X` behind, never
`latest` pointing at it: the previous checkpoint stays the one every resume path uses, and the next save
removes the leftover.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.distributed as dist


class HostCopy:
    """Copies tensors to host memory once per storage: DeepSpeed's state dicts and this rank's fragments of
    the layout-independent files are views of the same flat ZeRO partitions, which are copied once and
    shared by every view of them."""

    def __init__(self):
        self._copies: dict[tuple, torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in self._copies:
            copy = torch.empty(storage.nbytes(), dtype=torch.uint8)
            copy.untyped_storage().copy_(storage)
            self._copies[key] = copy
        return torch.empty(0, dtype=tensor.dtype).set_(self._copies[key].untyped_storage(), tensor.storage_offset(),
                                                        tensor.size(), tensor.stride())


class BackgroundSaver:
    """Runs one save's `finish(group)` at a time in a thread. Collective to create (a new process group)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, finish: Callable) -> None:
        self.wait()

        def run():
            try:
                finish(self.group)
            except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=run, name="nvium-checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        """Whether the save in flight has ended with an error (which `wait` raises)."""
        return self._thread is not None and not self._thread.is_alive() and self._error is not None

    def wait(self) -> None:
        """Returns once no save is in flight; raises the error the last one hit, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
