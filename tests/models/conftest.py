"""Model tests run single-threaded: their tensors are tiny, and intra-op threads only add contention on a shared
2-core CI machine (measured: several times slower wall time under load)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
