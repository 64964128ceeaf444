"""Everything that differs between the torch releases the project supports, in one place.

Supported: torch 2.3.1 (the floor stack) to torch 2.14 (the default stack). Code elsewhere calls
these helpers instead of testing versions itself.
"""

import torch

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


class _Placeholder:
    """Stands in for a class a checkpoint pickles but that must not be imported from it (e.g. an
    mmcv ConfigDict in an official checkpoint's `meta`). It accepts any arguments, items and
    state and keeps them as data, so loading it runs no code from the file."""

    def __init__(self, *args, **kwargs):
        self.__dict__["args"] = args

    def __setitem__(self, key, value):  # pickle fills dict subclasses item by item
        self.__dict__.setdefault("items", {})[key] = value

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __repr__(self):
        return f"<placeholder {type(self).__module__}.{type(self).__qualname__}>"


def _placeholder(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (_Placeholder,), {"__module__": module, "__qualname__": name})


# Plain-data builtins pickle reduces through; torch 2.3's weights-only allow-list lacks them.
_SAFE_BUILTINS = {
    f"{m}.{t.__name__}": t
    for t in (set, frozenset, complex, bytearray, slice)
    for m in ("builtins", "__builtin__")  # the latter: protocol-2 pickles
}


def _restricted_pickle_module():
    """A pickle module whose Unpickler resolves only what torch's weights-only loader allows
    (plus `_SAFE_BUILTINS`) and turns every other global into a placeholder: the restricted
    unpickler of the `pickle` documentation."""
    import pickle
    import types

    from torch._weights_only_unpickler import _get_allowed_globals  # present in 2.3 .. 2.14

    allowed = {**_get_allowed_globals(), **_SAFE_BUILTINS}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return allowed.get(f"{module}.{name}") or _placeholder(f"{module}.{name}")

    mod = types.ModuleType("petr_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    return mod


def torch_load(path, map_location="cpu", placeholders: bool = False):
    """`torch.load` that never runs code from the file, on every supported torch.

    Tensors, containers and plain Python values load with `weights_only=True`. Other classes the
    file pickles (official mmcv checkpoints may keep a ConfigDict and the like in `meta`) raise
    pickle.UnpicklingError, or with `placeholders` load as inert `_Placeholder` objects:
    - torch >= 2.5 allow-lists the placeholders by name (`get_unsafe_globals_in_checkpoint` +
      `safe_globals`);
    - torch 2.3 / 2.4 have no such allow-list, and weights_only fills only exact dicts (a dict
      subclass fails on every torch): a restricted unpickler stands in for those cases.
    """
    import pickle

    import torch.serialization as ser

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not placeholders:
            raise
    if hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        try:
            unknown = ser.get_unsafe_globals_in_checkpoint(path)
            with ser.safe_globals([_placeholder(n) for n in unknown]):
                return torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, ValueError):  # ValueError: a pre-zip (legacy) file
            pass
    # weights_only=False only to hand torch a pickle module; that module resolves nothing beyond
    # torch's own weights-only allow-list, so no code from the file can run either.
    return torch.load(
        path,
        map_location=map_location,
        weights_only=False,
        pickle_module=_restricted_pickle_module(),
    )


# torch.library.custom_op / register_fake / register_autograd arrived in torch 2.4; before that
# the deformable-attention kernels are wrapped in a plain autograd.Function (opaque to dynamo).
HAS_CUSTOM_OP = TORCH_VERSION >= (2, 4) and hasattr(torch.library, "custom_op")
