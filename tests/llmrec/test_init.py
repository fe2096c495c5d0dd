"""Importing llmrec drops bitsandbytes' "pip install kernels" hint (every command printed it) and nothing else."""
import logging
import subprocess
import sys

import llmrec  # noqa: F401 - installs the filter


def test_bitsandbytes_kernels_hint_is_dropped_other_warnings_are_kept(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels`", "No module named 'kernels'")
        log.warning("some other bitsandbytes problem")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["some other bitsandbytes problem"]


def test_no_command_prints_the_kernels_hint():
    out = subprocess.run([sys.executable, "-c", "import llmrec.cli, peft"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr + out.stdout
