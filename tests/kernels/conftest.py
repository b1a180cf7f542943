"""Kernel tests: every ISA path is a case (kernel_helpers.ISAS; skipped, with the reason, where this CPU lacks it);
the selected one is restored afterwards."""
import pytest

from powerinfer import kernels


@pytest.fixture
def use_isa():
    """use_isa(name) switches the kernel set for this test only."""
    before = kernels.isa()
    yield kernels.set_isa
    kernels.set_isa(before)
