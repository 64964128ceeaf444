"""Everything that differs between the torch releases the project supports, in one place.

Supported: torch 2.3.1 (the floor stack) to torch 2.14 (the default stack). Code elsewhere calls
these helpers instead of testing versions itself.
"""

import torch

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
