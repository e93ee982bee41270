import pytest  # noqa: E402
import torch  # noqa: E402

import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)


@pytest.fixture
def one_thread():
    """Small tensor operations on a busy 2-core machine run many times faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
