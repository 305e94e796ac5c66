"""A device-strict test mode: the CPU stands in for an accelerator, and device mistakes raise as on CUDA.

Code that forgets to move a tensor to the model's device passes every CPU test and breaks on the first
GPU run. This mode makes those mistakes fail on a CPU. While it is enabled, the ``meta`` device behaves
like a CUDA device whose memory is the CPU's:

* ``torch.zeros(..., device="meta")``, ``t.to("meta")``, ``module.to("meta")``, ``torch.load(...,
  map_location="meta")`` give a :class:`DeviceTensor`: a tensor that *reports* ``device(type='meta')``
  and holds a real CPU tensor, on which every operation computes. Results equal plain CPU results
  bitwise (the same CPU kernels run, in the same order).
* Mixing devices raises as CUDA does: every tensor argument of an operation must be on the device,
  except CPU 0-dim tensors (scalars), CPU index tensors of ``t[idx]`` / ``t[idx] = v`` and the
  source of a copy (``dst.copy_(src)``, ``t.to(device)``). ``index_select``, ``gather``, ``scatter``,
  ``embedding``, losses and comparisons with a non-scalar CPU tensor raise, as on CUDA.
  (These rules are PyTorch's own model of CUDA eager semantics, ``FakeTensor._find_common_device``.)
* ``.numpy()`` and ``np.asarray(t)`` raise ("can't convert meta device type tensor to numpy");
  ``.cpu()`` returns a plain CPU tensor with the same values; ``.item()``, ``.tolist()``, ``float(t)``
  work, as on CUDA (each is a host sync there).
* Generators: ``torch.Generator(device="meta")`` returns a :class:`DeviceGenerator` (a CPU generator
  that reports the device ``meta``). As on CUDA, a random operation on the device needs a device
  generator or none (then the global RNG, which here is the CPU's), and a CPU operation a CPU one;
  otherwise "Expected a 'meta' device type for generator but found 'cpu'".
* ``torch.save`` of device tensors stores their data with the location ``meta``;
  ``torch.load(f)`` restores them on the device, ``torch.load(f, map_location="cpu")`` on the CPU.

Known differences from CUDA: the device RNG *is* the CPU's global RNG (so ``torch.manual_seed``
and ``torch.random.fork_rng(devices=[])`` cover it); in-place operations that change a device
tensor's shape (``resize_``, ``set_``, ``unsqueeze_``) are not supported and raise
``NotImplementedError``; ``.data = plain_cpu_tensor`` on a device tensor raises (CUDA moves the
tensor to the CPU); ``fused=True`` optimisers refuse the ``meta`` device.

Use: ``enable()`` / ``disable()`` (for the rest of the process, in the calling thread, where the autograd
engine also runs this device's backward passes; threads started elsewhere do not see the mode), or
``with strict_device():``; in pytest the ``strict_device`` fixture of ``tests/test_device_strict.py``;
in a subprocess or Jupyter kernel ``PYTHONPATH=<absolute>/tests/strict_site MARGINLAB_DEVICE_STRICT=1``, with
``MARGINLAB_DEVICE=meta`` so that ``marginlab.config.device()`` picks the device.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "DEVICE",
    "DeviceGenerator",
    "DeviceTensor",
    "disable",
    "enable",
    "enabled",
    "is_device_tensor",
    "strict_device",
    "unwrap",
]

DEVICE = torch.device("meta")
_CPU = torch.device("cpu")
aten = torch.ops.aten

# Operations whose tensor arguments may live on different devices (as on CUDA).
_COPY_OPS = frozenset({aten.copy_.default, aten.copy.default, aten._foreach_copy_.default,
                       aten._foreach_copy.default, aten._copy_from.default,
                       aten._copy_from_and_resize.default, aten.lift_fresh.default})
# t[idx] / t[idx] = v: index tensors may be on the CPU (or on t's device); values must be on t's
# device or be a CPU 0-dim tensor.
_INDEX_OPS = frozenset({aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_put.default,
                        aten.index_put_.default, aten._index_put_impl_.default,
                        aten._unsafe_index_put.default})
# Operations that read only metadata: no device check.
_METADATA_OPS = frozenset({aten.is_same_size.default, aten._has_compatible_shallow_copy_type.default,
                           aten.is_pinned.default, aten._nested_tensor_size.default})


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device: reports ``meta``, computes on the CPU tensor ``_elem`` it holds."""

    _elem: torch.Tensor
    __slots__ = ("_elem",)

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> DeviceTensor:
        if type(elem) is not torch.Tensor and not isinstance(elem, torch.nn.Parameter):
            raise TypeError(f"DeviceTensor wraps a plain CPU tensor, got {type(elem).__name__}")
        if elem.device.type != "cpu":
            raise ValueError(f"DeviceTensor wraps a CPU tensor, got one on {elem.device}")
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=DEVICE, requires_grad=requires_grad,
        )
        r._elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        body = repr(self._elem)
        grad = f", grad_fn=<{type(self.grad_fn).__name__}>" if self.grad_fn is not None else ""
        if self.requires_grad and self.grad_fn is None:
            grad = ", requires_grad=True"
        return f"DeviceTensor({body}, device='{DEVICE.type}'{grad})"

    def __reduce_ex__(self, proto):
        # Like a CUDA tensor: the data is stored, restored on the device (or where map_location says).
        return (torch._utils._rebuild_device_tensor_from_cpu_tensor,
                (self._elem.detach().clone(), self.dtype, str(DEVICE), self.requires_grad))

    def numpy(self, *, force: bool = False):
        if force:  # as on CUDA: a copy to host memory
            return self._elem.detach().resolve_conj().resolve_neg().numpy()
        raise TypeError(f"can't convert {DEVICE.type} device type tensor to numpy. Use Tensor.cpu() to copy "
                        "the tensor to host memory first. (strict device mode)")

    def __format__(self, spec: str) -> str:
        if self.dim() == 0:  # f"{loss:.3f}", as for any tensor (a host sync on CUDA)
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def tolist(self):
        return self._elem.tolist()  # a host sync on CUDA, allowed there

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        return torch._C.TensorBase.data.__get__(self)  # shares the memory, own version counter

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        if not isinstance(new, DeviceTensor):
            raise NotImplementedError(
                "strict device mode: `device_tensor.data = tensor` needs a tensor on the device "
                f"({DEVICE.type}), got one on {new.device}")
        torch._C.TensorBase.data.__set__(self, new)  # shapes, dtype, version counter
        self._elem = new._elem


def is_device_tensor(t: Any) -> bool:
    """Whether ``t`` lives on the stand-in device."""
    return isinstance(t, DeviceTensor)


def unwrap(t: Any) -> Any:
    """The CPU tensor behind a device tensor (shares its memory); anything else unchanged."""
    return t._elem if isinstance(t, DeviceTensor) else t


class DeviceGenerator(torch._C.Generator):
    """A random generator on the stand-in device: a CPU generator that reports the device ``meta``."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return DEVICE

    def __repr__(self) -> str:
        return f"DeviceGenerator(device='{DEVICE.type}')"


_REAL_GENERATOR = torch._C.Generator


class _GeneratorType(type):
    """Metaclass of the ``torch.Generator`` stand-in: constructs, and answers isinstance like the real one."""

    def __call__(cls, device: Any = None) -> torch.Generator:
        if device is not None and torch.device(device).type == DEVICE.type:
            return DeviceGenerator()
        return _REAL_GENERATOR() if device is None else _REAL_GENERATOR(device)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_GENERATOR)

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and issubclass(sub, _REAL_GENERATOR)


class _Generator(metaclass=_GeneratorType):
    """Stands in for ``torch.Generator`` while the mode is enabled (see :class:`DeviceGenerator`)."""


# ---------------------------------------------------------------------------------------------- dispatch


def _device_of(t: torch.Tensor) -> torch.device:
    return DEVICE if isinstance(t, DeviceTensor) else t.device


def _mismatch(func, a: torch.device, b: torch.device, detail: str = "") -> RuntimeError:
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}! "
        f"(strict device mode: {func}{detail})")


def _common_device(func, tensors: list[torch.Tensor]) -> torch.device | None:
    """The device an operation runs on, raising as CUDA does when its tensors are on two devices
    (a CPU 0-dim tensor goes along with any device; FakeTensor._find_common_device's rule)."""
    common, common_is_scalar = None, False
    for t in tensors:
        dev = _device_of(t)
        scalar = dev.type == "cpu" and t.dim() == 0
        if common is None:
            common, common_is_scalar = dev, scalar
        elif dev == common:
            common_is_scalar = common_is_scalar and scalar
        elif scalar:
            continue
        elif common_is_scalar:
            common, common_is_scalar = dev, scalar
        else:
            raise _mismatch(func, common, dev)
    return common


def _check_index(func, args, kwargs) -> None:
    self = args[0]
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    dev = _device_of(self)
    for idx in indices:
        if isinstance(idx, torch.Tensor) and _device_of(idx) not in (dev, _CPU):
            raise RuntimeError(
                "indices should be either on cpu or on the same device as the indexed tensor "
                f"({dev}) (strict device mode: {func})")
    values = args[2] if len(args) > 2 else kwargs.get("values")
    if isinstance(values, torch.Tensor) and _device_of(values) != dev and not (
            values.dim() == 0 and _device_of(values).type == "cpu"):
        raise _mismatch(func, dev, _device_of(values), " (values)")


@functools.cache
def _mutated_outputs(func) -> tuple[tuple[int, int | str], ...]:
    """For each output that is an argument mutated in place: (output index, argument position or name)."""
    schema = func._schema
    where: dict[Any, int | str] = {}
    for i, a in enumerate(schema.arguments):
        info = a.alias_info
        if info is not None and info.is_write:
            where[frozenset(info.before_set)] = a.name if a.kwarg_only else i
    out = []
    for j, r in enumerate(schema.returns):
        info = r.alias_info
        if info is not None and info.is_write and frozenset(info.before_set) in where:
            out.append((j, where[frozenset(info.before_set)]))
    return tuple(out)


def _arg(args, kwargs, key: int | str) -> Any:
    return kwargs.get(key) if isinstance(key, str) else (args[key] if key < len(args) else None)


def _wrap(out: Any) -> Any:
    return tree_map(lambda t: DeviceTensor(t) if type(t) is torch.Tensor else t, out)


def _unwrap_all(tree: Any) -> Any:
    return tree_map(unwrap, tree)


def _dispatch(func, args: tuple, kwargs: dict) -> Any:
    target = kwargs.get("device")
    target = torch.device(target) if target is not None else None
    flat, _ = tree_flatten((args, kwargs))
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    on_device = any(isinstance(t, DeviceTensor) for t in tensors)

    if target is not None:  # factories, *_like, _to_copy: the result goes to `target`
        to_device = target.type == DEVICE.type
        if not to_device and not on_device:
            return func(*args, **kwargs)
        kwargs = {**_unwrap_all(kwargs), "device": _CPU} if to_device else _unwrap_all(kwargs)
        out = func(*_unwrap_all(args), **kwargs)
        return _wrap(out) if to_device else out

    if not on_device:
        return func(*args, **kwargs)

    if func in _INDEX_OPS:
        _check_index(func, args, kwargs)
        device = _device_of(args[0])
    elif func in _COPY_OPS or func in _METADATA_OPS:
        device = _device_of(args[0]) if isinstance(args[0], torch.Tensor) else DEVICE
    else:
        device = _common_device(func, tensors)

    out = func(*_unwrap_all(args), **_unwrap_all(kwargs))
    mutated = _mutated_outputs(func)
    if mutated:
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for j, key in mutated:
            original = _arg(args, kwargs, key)
            if isinstance(original, DeviceTensor):
                _check_metadata(func, original)
            outs[j] = original
        if isinstance(out, (tuple, list)):
            return type(out)(outs)
        return outs[0]
    return _wrap(out) if device.type == DEVICE.type else out


def _check_metadata(func, t: DeviceTensor) -> None:
    e = t._elem
    if e.shape != t.shape or e.stride() != t.stride() or e.storage_offset() != t.storage_offset():
        raise NotImplementedError(
            f"strict device mode: {func} changed a device tensor's shape or strides in place "
            f"({tuple(t.shape)} -> {tuple(e.shape)}); this stand-in device cannot follow that")


# Python-level constructors that copy data to the device in C++, out of the dispatch mode's sight.
_DATA_CONSTRUCTORS = frozenset({torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor})


def _generators(args, kwargs) -> list[torch.Generator]:
    gens = [g for g in (kwargs.get("generator"),) if isinstance(g, _REAL_GENERATOR)]
    return gens + [a for a in args if isinstance(a, _REAL_GENERATOR)]


def _check_generators(func, gens, args, kwargs) -> None:
    """A random op on the device needs a device generator, one on the CPU a CPU generator (as on CUDA).

    Checked at the Python level: below it, a :class:`DeviceGenerator` is no longer told apart from a CPU one."""
    target = kwargs.get("device")
    if target is not None:
        device = torch.device(target)
    else:
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        device = _device_of(tensors[0]) if tensors else _CPU
        if any(isinstance(t, DeviceTensor) for t in tensors):
            device = DEVICE
    for g in gens:
        gdev = DEVICE if isinstance(g, DeviceGenerator) else g.device
        if gdev.type != device.type:
            raise RuntimeError(f"Expected a '{device.type}' device type for generator but found "
                               f"'{gdev.type}' (strict device mode: {getattr(func, '__name__', func)})")


def _construct_from_data(func, args, kwargs):
    """``torch.tensor(data, device="meta")`` and friends: built on the CPU, then copied to the device."""
    kwargs = dict(kwargs)
    requires_grad = kwargs.pop("requires_grad", False)
    if func is torch.Tensor.new_tensor:
        self, data = args[0], args[1]
        kwargs.setdefault("dtype", self.dtype)
    else:
        self, data = None, args[0]
    if func in (torch.as_tensor, torch.asarray) and isinstance(data, DeviceTensor):
        out = data if kwargs.get("dtype") is None else data.to(kwargs["dtype"])  # no copy, as on CUDA
    else:
        kwargs["device"] = _CPU
        data = data.cpu() if isinstance(data, DeviceTensor) else data
        cpu = torch.tensor(data, **kwargs) if self is not None else func(data, *args[1:], **kwargs)
        out = cpu.to(DEVICE)
    return out.requires_grad_(True) if requires_grad else out


class _StrictFunctionMode(TorchFunctionMode):
    """Python-level half of the mode: generator devices, and ``torch.tensor(..., device="meta")``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_CONSTRUCTORS:
            dev = kwargs.get("device")
            if func is torch.Tensor.new_tensor and dev is None:
                dev = args[0].device
            if dev is not None and torch.device(dev).type == DEVICE.type:
                return _construct_from_data(func, args, kwargs)
        elif "generator" in kwargs or any(isinstance(a, _REAL_GENERATOR) for a in args):
            _check_generators(func, _generators(args, kwargs), args, kwargs)
        return func(*args, **kwargs)


class _StrictDeviceMode(TorchDispatchMode):
    """Turns ``device="meta"`` factories and copies into :class:`DeviceTensor` s and checks every op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


# ---------------------------------------------------------------------------------------------- torch.load


_REAL_LOAD = torch.load


def _is_device(loc: Any) -> bool:
    return isinstance(loc, (str, torch.device)) and torch.device(loc).type == DEVICE.type


@functools.wraps(_REAL_LOAD)
def _load(f, map_location=None, *args, **kwargs):
    """``torch.load`` that honours ``map_location="meta"`` (and ``{...: "meta"}``) with the data kept."""
    if _is_device(map_location):
        return _to_device_tree(_REAL_LOAD(f, "cpu", *args, **kwargs))
    if isinstance(map_location, dict) and any(_is_device(v) for v in map_location.values()):
        if not all(_is_device(v) for v in map_location.values()):
            raise NotImplementedError("strict device mode: a map_location dict must map everything to "
                                      f"{DEVICE.type} or nothing to it")
        return _to_device_tree(_REAL_LOAD(f, "cpu", *args, **kwargs))
    return _REAL_LOAD(f, map_location, *args, **kwargs)


def _to_device_tree(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return obj.to(DEVICE)
    if isinstance(obj, torch.Tensor):
        return obj.to(DEVICE)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device_tree(v)) for k, v in obj.items()) if type(obj) is not dict else {
            k: _to_device_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device_tree(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_device_tree(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------- switch


_state = threading.local()
_lock = threading.Lock()
_active: dict[str, Any] = {}
_WARNING = r".*copying from a non-meta parameter in the checkpoint to a meta parameter.*"


def enabled() -> bool:
    """Whether the mode is on (in this process)."""
    return bool(_active)


def enable() -> None:
    """Turn the mode on for the rest of the process (idempotent)."""
    with _lock:
        if _active:
            return
        fmode, mode = _StrictFunctionMode(), _StrictDeviceMode()
        fmode.__enter__()
        mode.__enter__()
        _active.update(fmode=fmode, mode=mode, generator=torch.Generator, load=torch.load)
        torch.Generator = _Generator  # type: ignore[misc, assignment]
        torch.load = _load  # type: ignore[assignment]
        torch.serialization.load = _load  # type: ignore[assignment]
        # load_state_dict warns that copying into a meta parameter is a no-op; here it is a real copy
        warnings.filterwarnings("ignore", message=_WARNING, category=UserWarning)


def disable() -> None:
    """Turn the mode off (device tensors already made keep computing and checking)."""
    with _lock:
        if not _active:
            return
        _active["mode"].__exit__(None, None, None)
        _active["fmode"].__exit__(None, None, None)
        torch.Generator = _active["generator"]  # type: ignore[misc]
        torch.load = _active["load"]  # type: ignore[assignment]
        torch.serialization.load = _active["load"]  # type: ignore[assignment]
        _active.clear()


@contextlib.contextmanager
def strict_device() -> Iterator[torch.device]:
    """``with strict_device() as dev:`` — the mode on inside the block (off after it, unless it was on)."""
    was_on = enabled()
    enable()
    try:
        yield DEVICE
    finally:
        if not was_on:
            disable()
