#!/usr/bin/env python
"""Regenerate tests/data/swin_tiny_features.pt: a tiny Swin's features computed by the project's
former Swin implementation, which Detectron2's replaced (petr/modeling/backbone/swin.py).

    PYTHONPATH=projects/PETR python tests/make_swin_fixture.py    (repository root, needs git)

The former implementation is read from git history (`REFERENCE_COMMIT`), never from the working
tree, so a regenerated fixture still compares Detectron2's Swin with an independent one.
test_swin.py rebuilds the same weights and images with `seeded_state_dict` / `seeded_images`.
"""

import os
import subprocess
import types
from typing import Dict, Mapping, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "swin_tiny_features.pt")
REFERENCE_COMMIT = "56e5bbe6cb505db3bc1a156b7599c919b99bf085"
REFERENCE_PATH = "projects/PETR/petr/modeling/backbone/swin.py"
# Two blocks per stage, so every stage has a shifted window; stage sizes down to 1 token.
ARCH = dict(
    embed_dim=16,
    depths=[2, 2, 2, 2],
    num_heads=[1, 2, 2, 4],
    window_size=7,
    drop_path_rate=0.0,
    out_features=["res2", "res3", "res4", "res5"],
)
# (H, W): patch and window multiples; neither (res2 16x21, odd sizes at res4/res5); a small
# image padded to one window everywhere; a portrait image not divisible by the patch.
SIZES = [(56, 56), (61, 83), (29, 45), (33, 17)]


def seeded_state_dict(
    template: Mapping[str, torch.Tensor], seed: int = 0
) -> Dict[str, torch.Tensor]:
    """Uniform weights drawn in sorted-name order, scaled so that every term matters.

    LayerNorm weights 1 +- 0.5, other vectors +-0.2, bias tables +-1, matrices with variance
    1/fan_in; `relative_position_index` is copied from `template`.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(template):
        t = template[name]
        if name.endswith("relative_position_index"):
            out[name] = t.clone()
            continue
        u = torch.rand(t.shape, generator=g) * 2 - 1
        if name.endswith("relative_position_bias_table"):
            out[name] = u
        elif t.dim() == 1:
            norm_weight = name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
            out[name] = 1 + 0.5 * u if norm_weight else 0.2 * u
        else:
            out[name] = u * (3.0 / t[0].numel()) ** 0.5
    return out


def seeded_images(size: Tuple[int, int], seed: int = 1) -> torch.Tensor:
    """(2, 3, H, W) uniform in [-2, 2]: two normalised images."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, 3, *size), generator=g) * 4 - 2


def checksum(tensors) -> float:
    """Sum of absolute values in float64: detects a change in the seeded draws."""
    return float(sum(t.double().abs().sum() for t in tensors))


def _reference_module() -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{REFERENCE_COMMIT}:{REFERENCE_PATH}"],
        cwd=HERE,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Register nothing: Detectron2's registry may already hold today's `build_swin_backbone`.
    source = source.replace("@BACKBONE_REGISTRY.register()\n", "")
    module = types.ModuleType("petr_reference_swin")
    exec(compile(source, f"{REFERENCE_COMMIT[:7]}:{REFERENCE_PATH}", "exec"), module.__dict__)
    return module


def main() -> None:
    model = _reference_module().PETRSwinTransformer(**ARCH).eval()
    sd = seeded_state_dict(model.state_dict())
    model.load_state_dict(sd)
    features = {}
    images = {}
    with torch.no_grad():
        for h, w in SIZES:
            x = seeded_images((h, w))
            images[f"{h}x{w}"] = checksum([x])
            features[f"{h}x{w}"] = model(x)
    torch.save(
        {
            "reference_commit": REFERENCE_COMMIT,
            "torch_version": str(torch.__version__),
            "arch": ARCH,
            "state_dict_shapes": {k: list(v.shape) for k, v in sd.items()},
            "weights_checksum": checksum(sd.values()),
            "images_checksum": images,
            "features": features,
        },
        FIXTURE,
    )
    print(f"Wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes)")


if __name__ == "__main__":
    main()
