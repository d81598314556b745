"""On the tests' ``PYTHONPATH`` (tests/conftest.py): processes the tests start run without torch.

The tests never use torch; ``tvm_ffi`` imports it whenever it is installed (here only for the example
model's export), which costs seconds of CPU in every process that imports TVM (agents, TVM's popen
workers, trackers). ``import torch`` fails in them instead, as when torch is not installed.
"""

import sys

sys.modules.setdefault("torch", None)
