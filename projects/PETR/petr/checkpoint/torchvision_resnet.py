"""torchvision ImageNet ResNet weights -> Detectron2 names, the backbone initialisation of the
official PETR recipe (`torchvision://resnet50`): the stride in the 3x3 conv, RGB input."""

import re
from typing import Dict, List, Mapping, Tuple

import torch

from .opera_rules import DROPPED, resnet_rules

_CLASSIFIER = r"fc\.(weight|bias)"


def convert_torchvision_resnet(
    sd: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """torchvision `resnet*` state dict -> ({"backbone.*": tensor} in Detectron2 names, dropped).

    Drops the classifier and BN batch counters; any other unknown key raises a ValueError naming it.
    """
    rules = [(re.compile(src), dst) for src, dst in resnet_rules()]
    out, dropped = {}, []
    for key, value in sd.items():
        if re.fullmatch(_CLASSIFIER, key) or re.fullmatch(DROPPED, key):
            dropped.append(key)
            continue
        for pattern, template in rules:
            m = pattern.fullmatch("backbone." + key)
            if m:
                out[template.format(**m.groupdict())] = value.float()
                break
        else:
            raise ValueError(f"'{key}' is not a torchvision ResNet parameter")
    if not out:
        raise ValueError("no ResNet parameters found: is this a torchvision ResNet state dict?")
    return out, dropped
