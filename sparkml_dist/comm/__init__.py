"""How workers communicate: strategies (how often, at which pace) and compressors (what is sent).

Registered here: strategies ``allreduce`` (every step, BSP) and ``local_sgd`` (k local steps, then a
parameter average); compressors ``none``, ``fp16`` and ``topk``. See ``base`` for the interface.
"""

from sparkml_dist.comm import allreduce, compression, local_sgd  # noqa: F401  (registers the built-ins)
from sparkml_dist.comm.base import COMPRESSORS, STRATEGIES, Compressor, Strategy, build_strategy

__all__ = ["COMPRESSORS", "STRATEGIES", "Compressor", "Strategy", "build_strategy"]
