"""llmrec: the library every stage shares (config, schema, prompts, model, io, cli)."""
import logging as _logging


class _DropBitsandbytesKernelHint(_logging.Filter):
    """bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
    kernels" at import time on AVX512-BF16 CPUs, and peft imports bitsandbytes whenever it is installed, so every
    command printed it. The hint does not apply here: `kernels` would download the kernel from a model hub at run
    time, which llmrec never does, and bitsandbytes falls back to its own CPU kernel. Only that one message is
    dropped; every other bitsandbytes warning still shows."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelHint())
