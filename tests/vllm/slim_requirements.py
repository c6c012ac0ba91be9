"""Print the requirements of the installed vLLM minus the GPU-only ones (a CPU test environment).

Used by ``.ci/run``: ``pip install torch==<cpu build>``, ``pip install --no-deps vllm==X``, then
``pip install -r <(python tests/vllm/slim_requirements.py)``. vLLM imports with the CPU torch
although it pins another torch version; its connector machinery and scheduler run on the CPU.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

# GPU kernels, CUDA libraries, the pinned torch family (the CPU torch is installed first) and
# media decoders: none is imported by vLLM's scheduler or connector code.
EXCLUDED = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer.*|apache-tvm-ffi|tilelang|"
    r"nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|"
    r"cupy.*|xformers|triton.*|numba|zentorch)$",
    re.IGNORECASE,
)


def main() -> int:
    for req in requires("vllm") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
        if not EXCLUDED.match(name):
            print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
