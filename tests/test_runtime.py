"""writesae.runtime: freed memory stays in the process, so the blocks a training step allocates are not faulted in
again every step."""
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from writesae.runtime import keep_freed_memory
from writesae.sae import SAEConfig, WriteSAE
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
sae = WriteSAE(SAEConfig("flat", 32, 32, n_feat=1024, k=16), seed=0)  # FlatSAE at the book's size
opt = torch.optim.Adam(sae.parameters())
S = torch.randn(256, 32, 32)
def steps(n):
    for _ in range(n):
        opt.zero_grad()
        sae(S).loss.backward()
        opt.step()
steps(8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 1000  # page faults a training step: glibc hands blocks of MiBs back and faults them in again
    assert kept < default / 10  # the heap settles within a few steps (an odd step still grows it)
