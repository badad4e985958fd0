"""Host batches to the training device, one batch ahead of the step, without the device ever waiting on the host.

DeviceTransfer moves a host Batch to the device. On CUDA the host tensors sit in pinned memory and are copied with
non_blocking=True on a side stream; an event recorded after the copies hands the batch over: the consumer's stream
waits on it (the host does not), and every device tensor is recorded on the consumer's stream, so its memory is not
reused while the step still reads it. On the CPU the host batch is the batch.

Prefetcher runs a pipeline's host iterator in a background thread exactly one batch ahead: while the consumer works
on batch k (on a GPU: while the host launches step k), the thread makes batch k+1 (decode, augmentation, labels) and
issues its copy. Order and content are those of the host iterator, so exact resume is unchanged; an exception of
the host iterator reaches the consumer at the batch where it happened.
"""
import dataclasses
import queue
import threading
from contextlib import closing, contextmanager
from typing import Generator, Iterator, Optional

import torch


class DeviceTransfer:
    """Copies of host batches (structalign.data.Batch: a dataclass of tensors and Nones) to `device` (cuda with its
    index, cpu, or any other torch device)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def bind_thread(self) -> None:
        """Make the device the calling thread's current one: a new thread starts on cuda:0, where it would open a
        CUDA context of its own (every rank of a multi-GPU run on one GPU)."""
        if self.cuda:
            torch.cuda.set_device(self.device)

    @contextmanager
    def side_stream(self):
        """Device work in this block (allocations, copies) runs on the side stream, ordered before the next send's
        event; yields the stream (for libraries that take one, such as DALI's feed_ndarray)."""
        with torch.cuda.stream(self.stream):
            yield self.stream

    def record(self) -> "torch.cuda.Event":
        """An event at the current end of the side stream (the host may wait on it without stalling the device)."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def send(self, batch):
        """(batch on the device, event its copies complete at, or None where nothing is asynchronous). Host tensors
        are copied from pinned memory on the side stream; tensors already on the device are kept."""
        if self.device.type == "cpu":
            return batch, None
        if not self.cuda:
            return _map(batch, lambda t: t.to(self.device)), None
        with self.side_stream():
            moved = _map(batch, self._copy)
        return moved, self.record()

    def receive(self, batch, ready):
        """The batch of send(), usable on the calling thread's current stream: that stream waits on `ready`."""
        if ready is None:
            return batch
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        for field in dataclasses.fields(batch):
            tensor = getattr(batch, field.name)
            if tensor is not None:
                tensor.record_stream(compute)
        return batch


def _map(batch, fn):
    """batch with fn applied to each of its tensors."""
    return dataclasses.replace(batch, **{f.name: fn(getattr(batch, f.name)) for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


_END = object()  # the host iterator is exhausted
_STOPPED = object()  # stop() was called from outside the consumer


class Prefetcher:
    """batches(): the batches of `host` (a generator of host batches) on transfer's device, made in a background
    thread one batch ahead of the consumer. stop() ends the thread (a later epoch of the same loader calls it)."""

    def __init__(self, host: Generator, transfer: DeviceTransfer):
        self._host: Optional[Generator] = host
        self.transfer = transfer
        self._slot = threading.Semaphore(1)  # batches the thread may make before the consumer takes the last one
        self._made = queue.SimpleQueue()  # (device batch, event) | BaseException | _END | _STOPPED
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="structalign-loader", daemon=True)

    def _produce(self) -> None:
        try:
            self.transfer.bind_thread()
            with closing(self._host):
                while True:
                    self._slot.acquire()
                    if self._stop.is_set():
                        return
                    try:
                        batch = next(self._host)
                    except StopIteration:
                        self._made.put(_END)
                        return
                    self._made.put(self.transfer.send(batch))
        except BaseException as e:  # every failure is the consumer's to raise, at the batch where it happened
            self._made.put(e)
        finally:
            self._host = None  # the host iterator refers to its loader, which refers to this object

    def batches(self) -> Iterator:
        """Yield the device batches in the host iterator's order; the thread starts at the first request."""
        self._thread.start()
        try:
            while True:
                item = _STOPPED if self._stop.is_set() else self._made.get()
                if item is _END:
                    return
                if item is _STOPPED:
                    raise RuntimeError("this epoch's iterator was stopped by a later loader.epoch() call of the same "
                                       "loader; one epoch of a loader is read at a time")
                if isinstance(item, BaseException):
                    raise item
                self._slot.release()  # the thread makes the next batch while this one is used
                yield self.transfer.receive(*item)
        finally:
            self.stop()

    def stop(self) -> None:
        """End the background thread (after the batch it is making, if any); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._slot.release()
        if self._thread.ident is not None:
            self._thread.join()
        elif self._host is not None:  # never started
            self._host.close()
            self._host = None
        self._made.put(_STOPPED)  # wakes a consumer waiting in another thread
