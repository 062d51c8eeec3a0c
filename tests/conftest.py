"""Shared pytest configuration: hypothesis profiles and device parametrisation."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI explores more examples than a local run; both skip the per-example deadline, since
# torch's first call on a shape can be slow on 2 cores.
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this machine has: the CPU, plus CUDA where a GPU is present."""
    return request.param
