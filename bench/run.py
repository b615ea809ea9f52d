"""Runs every benchmark in bench/ and prints its tables (`make bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import qat  # noqa: E402  (first: once deploy puts examples/ on sys.path, examples/qat.py would shadow it)
import attention_latency  # noqa: E402
import conv_outputs  # noqa: E402
import deploy  # noqa: E402
import ir_scale  # noqa: E402
import patterns  # noqa: E402
import prune  # noqa: E402
import ptq  # noqa: E402
import text  # noqa: E402
import zoo  # noqa: E402

if __name__ == "__main__":
    ir_scale.main([])
    patterns.main([])
    ptq.main([])
    deploy.main([])
    attention_latency.main([])
    conv_outputs.main([])
    zoo.main([])
    text.main([])
    prune.main([])
    qat.main([])
