import os

import torch

# Without a GPU, Triton kernels run through its interpreter; triton reads this when kernels are defined,
# so it must be set before any test module imports icecache's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (loaded once per test session)."""
    from icecache.models import load_default

    return load_default()


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M (32k context, hybrid local/global attention) and its tokenizer."""
    from icecache.models import load_model

    return load_model("gemma3-270m")
