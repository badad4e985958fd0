"""The way of a batch to the device: made one batch ahead of the step in a background thread; on CUDA copied from
pinned memory with non_blocking=True on a side stream, handed to the compute stream by an event (the host never
synchronises a stream), each device tensor recorded on the compute stream; DALI's GPU output copied on the side
stream, its buffer released only once that copy's event is complete.

No GPU here: FakeCuda stands in for torch.cuda and logs what the loader does with streams, events and copies."""
import dataclasses
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from structalign.data import AugmentConfig, dali_pipeline, make_loader, open_dataset

CUDA = torch.device("cuda", 0)


class _OnDevice(torch.Tensor):
    """A tensor FakeCuda put "on cuda:0" (its data stays on the CPU)."""

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True


class _Pinned(torch.Tensor):
    """A host tensor FakeCuda "pinned"."""


class _Stream:
    def __init__(self, fake, name):
        self.fake, self.name = fake, name

    def wait_event(self, event):
        self.fake.add("wait_event", stream=self, event=event)

    def wait_stream(self, other):
        self.fake.add("wait_stream", stream=self, other=other)

    def synchronize(self):
        self.fake.add("stream.synchronize", stream=self)


class _Event:
    def __init__(self, fake):
        self.fake, self.stream = fake, None

    def record(self, stream=None):
        self.stream = stream or self.fake.current()
        self.fake.add("record", event=self, stream=self.stream)

    def synchronize(self):
        self.fake.add("event.synchronize", event=self)

    def query(self):
        return True


class FakeCuda:
    """torch.cuda on a CPU-only build: streams, events, pinned memory and device tensors that log their use.

    log: dicts with "op" (copy, alloc, record, wait_event, wait_stream, record_stream, stream.synchronize,
    event.synchronize, device.synchronize; the tests add dali copy, outputs, received) and "thread"."""

    def __init__(self, monkeypatch):
        self.log = []
        self.compute = _Stream(self, "compute")
        self._local = threading.local()
        to, empty, as_tensor = torch.Tensor.to, torch.empty, torch.as_tensor

        def fake_to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
            if target is None or torch.device(target).type != "cuda":
                return to(tensor, *args, **kwargs)
            if isinstance(tensor, _OnDevice):
                return tensor
            return self.copy(tensor, pinned=isinstance(tensor, _Pinned), non_blocking=kwargs.get("non_blocking", False))

        def fake_empty(*size, device=None, **kwargs):
            if device is None or torch.device(device).type != "cuda":
                return empty(*size, device=device, **kwargs)
            out = empty(*size, **kwargs).as_subclass(_OnDevice)
            self.add("alloc", out=out, stream=self.current())
            return out

        def fake_as_tensor(data, dtype=None, device=None):
            if device is None or torch.device(device).type != "cuda":
                return as_tensor(data, dtype=dtype, device=device)
            return self.copy(as_tensor(data, dtype=dtype), pinned=False, non_blocking=False)

        @contextmanager
        def stream_context(stream):
            stack = self._stack()
            stack.append(stream)
            try:
                yield
            finally:
                stack.pop()

        monkeypatch.setattr(torch.Tensor, "to", fake_to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: torch.Tensor.clone(t).as_subclass(_Pinned))
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a: isinstance(t, _Pinned))
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, stream: self.add("record_stream", tensor=t, stream=stream))
        monkeypatch.setattr(torch, "empty", fake_empty)
        monkeypatch.setattr(torch, "as_tensor", fake_as_tensor)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: _Stream(self, "side"))
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: _Event(self))
        monkeypatch.setattr(torch.cuda, "stream", stream_context)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current())
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.add("set_device", device=device))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.add("device.synchronize"))

    def _stack(self):
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current(self):
        stack = self._stack()
        return stack[-1] if stack else self.compute

    def add(self, op, **fields):
        self.log.append(dict(op=op, thread=threading.current_thread(), **fields))

    def copy(self, tensor, pinned, non_blocking):
        out = torch.Tensor.clone(tensor).as_subclass(_OnDevice)
        self.add("copy", out=out, pinned=pinned, non_blocking=non_blocking, stream=self.current())
        return out

    def where(self, op, **match):
        """Positions in the log of the entries of `op` whose fields are (identical to) `match`."""
        return [i for i, e in enumerate(self.log) if e["op"] == op and all(e.get(k) is v for k, v in match.items())]

    def recorded_after(self, event, position: int, stream) -> bool:
        """Whether `event` was recorded on `stream` after log position `position`."""
        return any(i > position for i in self.where("record", event=event, stream=stream))


def _tensors(batch) -> dict:
    """name -> tensor of a Batch (its None fields left out)."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}


def _equal(got, expected) -> bool:
    """Whether device batches (FakeCuda's) hold the tensors of host batches."""
    return len(got) == len(expected) and all(
        _tensors(a).keys() == _tensors(b).keys()
        and all(torch.equal(t.as_subclass(torch.Tensor), _tensors(b)[name]) for name, t in _tensors(a).items())
        for a, b in zip(got, expected))


def _read(loader, fake, epoch):
    """The epoch's batches, a "received" entry logged after each."""
    batches = []
    for batch in loader.epoch(epoch):
        fake.add("received", batch=batch)
        batches.append(batch)
    return batches


def _assert_handed_over_by_event(fake, batches, made_by):
    """Each batch reached the consumer (main thread) with the compute stream waiting on an event recorded on a side
    stream after the device work that made each tensor (made_by(tensor) -> its log position), and each tensor
    recorded on the compute stream; nobody synchronised a stream or the device, the consumer no event."""
    main = threading.main_thread()
    assert not fake.where("stream.synchronize") and not fake.where("device.synchronize")
    assert not [e for e in fake.log if e["op"] == "event.synchronize" and e["thread"] is main]
    for batch in batches:
        received = fake.where("received", batch=batch)[0]
        waits = [fake.log[i]["event"] for i in fake.where("wait_event", stream=fake.compute) if i < received]
        for name, tensor in _tensors(batch).items():
            assert isinstance(tensor, _OnDevice), name
            made = made_by(tensor)
            stream = fake.log[made]["stream"]
            assert stream is not fake.compute, f"{name} was made on the compute stream"
            assert any(fake.recorded_after(event, made, stream) for event in waits), \
                f"the compute stream did not wait for the copy of {name}"
            assert [i for i in fake.where("record_stream", tensor=tensor, stream=fake.compute) if i < received], \
                f"{name} was not recorded on the compute stream"


@pytest.fixture
def synth(synth_root):
    return open_dataset(synth_root, "wflw", "train")


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_the_next_batch_is_made_while_the_current_one_is_used(synth, backend, monkeypatch):
    kw = dict(batch_size=4, train=True, device="cpu", image_size=32, backend=backend, augment=AugmentConfig(), seed=3,
              num_threads=1)
    expected = [b.index for b in make_loader(synth, **kw).epoch(1)]
    loader = make_loader(synth, **kw)
    events = []  # ("request", k) before the consumer asks for batch k, ("made", k) when the loader made it
    made = [threading.Event() for _ in range(len(loader))]
    finish = loader.finish

    def counted(*args):
        batch = finish(*args)
        k = sum(1 for e in events if e[0] == "made")
        events.append(("made", k))
        made[k].set()
        return batch

    monkeypatch.setattr(loader, "finish", counted)
    batches = loader.epoch(1)
    got = []
    for k in range(len(loader)):
        events.append(("request", k))
        got.append(next(batches).index)
        if k + 1 < len(loader):  # "the step on batch k": batch k+1 is made meanwhile, unasked
            assert made[k + 1].wait(timeout=60), f"batch {k + 1} was not made while batch {k} was in use"
    with pytest.raises(StopIteration):
        next(batches)
    for k in range(1, len(loader)):  # and no further ahead than one batch
        assert events.index(("request", k - 1)) < events.index(("made", k))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)


def test_a_later_epoch_stops_an_unfinished_one(synth):
    loader = make_loader(synth, 4, train=True, device="cpu", image_size=32, backend="reference", num_threads=0)
    unfinished = loader.epoch(0)
    next(unfinished)
    assert len(list(loader.epoch(1))) == len(loader)
    with pytest.raises(RuntimeError, match="later loader.epoch"):
        next(unfinished)


def test_cuda_batches_are_copied_from_pinned_memory_without_blocking(synth, monkeypatch):
    kw = dict(batch_size=4, train=True, image_size=32, backend="reference", augment=AugmentConfig(), seed=5,
              num_threads=0)
    expected = list(make_loader(synth, device="cpu", **kw).epoch(2))
    fake = FakeCuda(monkeypatch)
    loader = make_loader(synth, device="cuda", **kw)
    got = _read(loader, fake, 2)

    copies = [fake.log[i] for i in fake.where("copy")]
    assert copies
    for copy in copies:
        assert copy["pinned"], "a copy from pageable memory"
        assert copy["non_blocking"], "a blocking copy"
        assert copy["stream"] is not fake.compute, "a copy on the compute stream"
        assert copy["thread"] is not threading.main_thread()  # made while the consumer works on the batch before
    assert [e for e in fake.log if e["op"] == "set_device" and e["device"] == CUDA], \
        "the loader's thread does not work on the loader's device"
    _assert_handed_over_by_event(fake, got, lambda t: fake.where("copy", out=t)[0])
    assert _equal(got, expected)


def test_dali_gpu_output_is_handed_over_by_an_event(synth, monkeypatch):
    pytest.importorskip("nvidia.dali")
    kw = dict(batch_size=4, train=True, image_size=32, backend="dali", augment=AugmentConfig(), seed=4, num_threads=1)
    expected = list(make_loader(synth, device="cpu", **kw).epoch(0))
    build = dali_pipeline._build_pipeline
    # DALI's CPU operators stand in for its GPU ones; everything on the torch side is FakeCuda's.
    monkeypatch.setattr(dali_pipeline, "_build_pipeline", lambda *args: build(*args[:3], None, *args[4:]))
    fake = FakeCuda(monkeypatch)
    loader = make_loader(synth, device="cuda", **kw)
    outputs = loader.pipe.outputs

    def logged_outputs():
        fake.add("outputs")
        return outputs()

    def feed_ndarray(dali_tensor, arr, cuda_stream=None):
        fake.add("dali copy", out=arr, stream=cuda_stream)
        arr.copy_(torch.from_numpy(np.array(dali_tensor)))
        return arr

    monkeypatch.setattr(loader.pipe, "outputs", logged_outputs)
    monkeypatch.setattr("nvidia.dali.plugin.pytorch.feed_ndarray", feed_ndarray)
    got = _read(loader, fake, 0)

    dali_copies = fake.where("dali copy")
    assert len(dali_copies) >= len(got)
    for position in dali_copies:  # DALI's buffer is given back only once the copy out of it is complete
        stream = fake.log[position]["stream"]
        assert stream is not fake.compute
        given_back = min([i for i in fake.where("outputs") if i > position], default=len(fake.log))
        waited = [fake.log[i]["event"] for i in fake.where("event.synchronize") if position < i < given_back]
        assert any(fake.recorded_after(event, position, stream) for event in waited)
    _assert_handed_over_by_event(fake, got, lambda t: (fake.where("dali copy", out=t) or fake.where("copy", out=t))[0])
    assert _equal(got, expected)
