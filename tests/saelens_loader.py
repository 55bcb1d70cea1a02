"""Runs inside the SAELens venv (``tests/saelens_venv.py``), started by ``tests/test_saelens.py``:
load each export folder with ``SAE.load_from_disk``, encode and decode, save what came out.

    <saelens venv>/bin/python -I tests/saelens_loader.py JOB.json

``JOB.json`` is a list of ``{"folder", "inputs", "out"}``. ``inputs`` is a safetensors file with
``x`` [N, D] (activations) and ``f`` [N, F] (latents); ``out`` gets ``f`` = encode(x) and
``x_hat`` = decode(f of the inputs), with the loaded SAE's class and config in its metadata.
Only SAELens, torch and safetensors are imported: nothing of patchsae.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file


def main(job_file: str) -> None:
    for job in json.loads(Path(job_file).read_text()):
        sae = SAE.load_from_disk(job["folder"])
        inputs = load_file(job["inputs"])
        with torch.no_grad():
            f_NF = sae.encode(inputs["x"])
            x_hat_ND = sae.decode(inputs["f"])
        info = {
            "class": type(sae).__name__,
            "sae_lens_version": sae_lens.__version__,
            "cfg": sae.cfg.to_dict(),
        }
        save_file(
            {"f": f_NF.contiguous(), "x_hat": x_hat_ND.contiguous()},
            job["out"],
            metadata={"info": json.dumps(info)},
        )


if __name__ == "__main__":
    main(sys.argv[1])
