"""`import kvsched` never imports vLLM; `import kvsched.vllm` without vLLM says how to install it."""

import subprocess
import sys

BLOCK_VLLM = "import sys; sys.modules['vllm'] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_import_kvsched_does_not_import_vllm():
    r = run("import sys, kvsched, kvsched.offload\nkvsched.BlockPool\nassert 'vllm' not in sys.modules, 'vllm imported'\n")
    assert r.returncode == 0, r.stderr


def test_kvsched_vllm_without_vllm_says_how_to_install():
    r = run(BLOCK_VLLM + "import kvsched.vllm\n")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and 'pip install "kvsched[vllm]"' in r.stderr, r.stderr
