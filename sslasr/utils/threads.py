"""Thread settings for small-tensor loops."""

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """Run the block on one intra-op thread. Searches issue thousands of ops on tensors a few
    hypotheses wide; waking a second thread for each costs more than it saves, and on a busy
    machine far more (a transducer beam search ran 20× slower on 2 threads than on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
