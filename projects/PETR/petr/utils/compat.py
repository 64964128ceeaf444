"""Everything that differs between the torch releases the project supports, in one place.

Supported: torch 2.3.1 (the floor stack) to torch 2.14 (the default stack). Code elsewhere calls
these helpers instead of testing versions itself.
"""

import torch

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])

# torch.library.custom_op / register_fake / register_autograd arrived in torch 2.4; before that
# the deformable-attention kernels are wrapped in a plain autograd.Function (opaque to dynamo).
HAS_CUSTOM_OP = TORCH_VERSION >= (2, 4) and hasattr(torch.library, "custom_op")
