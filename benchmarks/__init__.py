"""The repo's benchmarks, each a program: ``python -m benchmarks.<name>`` (BENCHMARKS.md).

tfmm is imported first so that a benchmark run as the program starts quietly
(`tfmm._startup`) even where it imports TensorFlow or Keras before tfmm.
"""

import tfmm  # noqa: F401
