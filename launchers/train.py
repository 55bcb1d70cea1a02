"""What ``torchrun`` runs: ``torchrun --nproc_per_node 2 -m patchsae.launchers.train --config ...``.

Same arguments as ``patchsae train``.
"""

from __future__ import annotations

import sys

from patchsae.launchers.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
