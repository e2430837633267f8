"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def inductor_fallback_random():
    """inductor draws its random numbers as eager does (compiled-vs-eager comparisons), undone by torch's own
    config patch: pytest 9's monkeypatch undo deletes the key from torch's config module instead of restoring it,
    which broke every later compile test."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        yield
