"""One trainer for every chapter: :func:`fit`, plus batched :func:`predict` / :func:`accuracy`.

Design (DESIGN §2-3, §7):

* The whole training set is moved to the device once; batches are index permutations drawn from a CPU
  ``torch.Generator`` seeded with ``seed`` — same seed, same batches on every device; on CPU, same seed ⇒
  bitwise-identical weights. Training runs inside ``torch.random.fork_rng`` seeded with ``seed``, so
  dropout and random starts inside a loss are reproducible too, and the caller's global RNG is untouched.
* ``fit`` does **not** re-initialise the model: seed before constructing it. The cache key includes the
  initial weights, so two differently initialised models never share a cache entry.
* No per-step host synchronisation: loss sums and correct counts live in device tensors and are read
  once per epoch.
* Labels: integer tensors. Binary labels may be {0, 1} or {-1, +1}; for cross-entropy (the default loss)
  and for accuracies, -1 ↦ class 0 and +1 ↦ class 1 (the :class:`~marginlab.models.BinaryLogits`
  convention); a custom ``loss_fn`` receives the labels unchanged. One-score models (output (N,) or
  (N, 1)) predict class 1 ⇔ score > 0.
* Cache: ``cache="tag"`` stores the trained state dict and the history under
  ``config.cache_dir()/<key>.pt`` (atomic write; loaded with ``weights_only=True``); see :func:`cache_key`.
"""
from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
import sys
import tempfile
import time
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config, threads

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SAMPLERS = ("shuffle", "balanced")
AUGMENTATIONS = ("crop_flip",)
#: Rows per forward pass of the evaluation helpers: WRN-34-10 on 32×32 images needs about 3 GB at this size
#: under ``no_grad``, the small nets far less, so it fits a 24 GB card with room for the resident data.
EVAL_BATCH_SIZE = 1024
_CACHE_FORMAT = 1

__all__ = [
    "History", "fit", "predict", "accuracy", "cache_key", "cache_path", "eval_mode", "class_indices",
    "OPTIMIZERS", "SAMPLERS", "AUGMENTATIONS", "EVAL_BATCH_SIZE", "StepSchedule", "step_schedule", "crop_flip",
    "RECIPES", "recipe", "progress_bar", "training_forbidden",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]
Callback = Callable[[int, nn.Module], "dict[str, Any] | None"]


# ---------------------------------------------------------------------------------------------- history


@dataclass
class History:
    """Per-epoch records of a :func:`fit` run.

    ``rows[0]`` is epoch 0 (before training: only the callbacks' values); ``rows[e]`` holds
    ``epoch``, ``loss`` (mean training loss over the epoch's batches), ``train_acc`` (accuracy of the
    batches' logits as they were trained on, NaN when the loss does not expose logits), ``lr``, ``steps``
    (optimiser steps so far), ``train_err`` (exact, eval mode; only with ``until_zero_error``) and the
    callbacks' values. ``meta`` holds ``cached`` (loaded from the cache), ``key``, ``seconds``, ``stopped``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str, default: Any = math.nan) -> list[Any]:
        """The values of ``name`` over the rows (``default`` where a row lacks it, so it aligns with ``epoch``)."""
        if not any(name in r for r in self.rows):
            raise KeyError(f"no history column {name!r}; columns: {self.columns}")
        return [r.get(name, default) for r in self.rows]

    @property
    def columns(self) -> list[str]:
        names: list[str] = []
        for r in self.rows:
            names += [k for k in r if k not in names]
        return names

    @property
    def last(self) -> dict[str, Any]:
        """The final row (after the last epoch trained)."""
        if not self.rows:
            raise IndexError("empty history")
        return self.rows[-1]

    @property
    def cached(self) -> bool:
        return bool(self.meta.get("cached", False))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        last = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (self.rows[-1] if self.rows else {}).items()
                if isinstance(v, (int, float, str))}
        return f"History({len(self.rows)} rows, cached={self.cached}, last={last})"


# ---------------------------------------------------------------------------------------------- helpers


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and restore every submodule's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return config.device()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _as_x(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    return x


def _as_y(y: Any, n: int | None = None) -> torch.Tensor:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor or numpy array, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"labels must be an integer tensor (class indices, or ±1 for binary problems), got dtype {y.dtype}; "
            "convert with y.long() if they are whole numbers"
        )
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"x and y have different lengths: {n} inputs but {y.shape[0]} labels")
    return y.long()


def class_indices(y: torch.Tensor) -> torch.Tensor:
    """Labels as class indices: {-1, +1} ↦ {0, 1}; non-negative labels unchanged. Raises on other negatives."""
    y = _as_y(y)
    if y.numel() and int(y.min()) < 0:
        bad = set(torch.unique(y).tolist()) - {-1, 1}
        if bad:
            raise ValueError(f"negative labels are only allowed as binary ±1 labels; found values {sorted(bad)}")
        return (y > 0).long()
    return y


def _predicted_class(out: torch.Tensor) -> torch.Tensor:
    """Argmax of K ≥ 2 logits; for one score (N,) / (N, 1): class 1 ⇔ score > 0."""
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        return (out.reshape(-1) > 0).long()
    if out.dim() != 2:
        raise ValueError(f"model output must be (N,), (N, 1) or (N, K) logits, got shape {tuple(out.shape)}")
    return out.argmax(1)


# ---------------------------------------------------------------------------------------------- evaluation


def _eval_batches(model: nn.Module, x: torch.Tensor, batch_size: int | None,
                  device: str | torch.device | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, chunk on the model's device, in the model's dtype) for every ``batch_size`` rows of ``x``."""
    if batch_size is None:
        batch_size = EVAL_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev, dtype = _model_device(model, device), _model_dtype(model)
    for i in range(0, x.shape[0], int(batch_size)):
        threads.balance()
        rows = slice(i, i + int(batch_size))
        yield rows, x[rows].to(dev, dtype=dtype, non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int | None = None,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Model outputs (logits) for ``x`` in eval mode under ``no_grad``, ``batch_size`` rows at a time
    (default :data:`EVAL_BATCH_SIZE`), computed on the model's device and returned on ``x``'s device
    (the CPU for a NumPy array).

    ``device`` defaults to the device of the model's parameters (the model is not moved)."""
    home = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x = _as_x(x)
    outs = []
    with eval_mode(model):
        for _, xb in _eval_batches(model, x, batch_size, device):
            outs.append(model(xb))
    return torch.cat(outs).to(home)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
             device: str | torch.device | None = None) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, ``batch_size`` rows at a time on the model's device;
    one host synchronisation at the end). ±1 labels are mapped to classes {0, 1}."""
    x = _as_x(x)
    yi = class_indices(_as_y(y, x.shape[0]))
    correct = None
    with eval_mode(model):
        for rows, xb in _eval_batches(model, x, batch_size, device):
            out = model(xb)
            hits = (_predicted_class(out) == yi[rows].to(out.device, non_blocking=True)).sum()
            correct = hits if correct is None else correct + hits
    return float(correct) / x.shape[0]


# ---------------------------------------------------------------------------------------------- fingerprints


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _code_fp(code: types.CodeType) -> Any:
    consts = tuple(_code_fp(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return ("code", code.co_qualname if hasattr(code, "co_qualname") else code.co_name,
            hashlib.sha256(code.co_code).hexdigest(), consts, code.co_names)


def _fingerprint(obj: Any, _depth: int = 0, _seen: frozenset = frozenset()) -> Any:
    """A stable, repr-able description of ``obj`` for cache keys: tensors by content hash, functions by module,
    qualname, bytecode, defaults and closure values, ``functools.partial`` by function and arguments."""
    if _depth > 8 or id(obj) in _seen:
        return ("...", type(obj).__qualname__)
    seen = _seen | {id(obj)}
    fp = functools.partial(_fingerprint, _depth=_depth + 1, _seen=seen)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, complex)):
        return repr(obj)
    if isinstance(obj, torch.Tensor):
        return ("tensor", _tensor_digest(obj))
    if isinstance(obj, np.ndarray):
        return ("ndarray", str(obj.dtype), obj.shape, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest())
    if isinstance(obj, torch.Generator):
        return ("generator", _tensor_digest(obj.get_state()))
    if isinstance(obj, (np.generic, torch.dtype, torch.device)):
        return repr(obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(fp(v) for v in obj))
    if isinstance(obj, (set, frozenset)):
        return (type(obj).__name__, tuple(sorted(repr(fp(v)) for v in obj)))
    if isinstance(obj, dict):
        return ("dict", tuple(sorted((repr(k), fp(v)) for k, v in obj.items())))
    if isinstance(obj, functools.partial):
        return ("partial", fp(obj.func), fp(obj.args), fp(obj.keywords))
    if isinstance(obj, types.MethodType):
        return ("method", fp(obj.__self__), fp(obj.__func__))
    if isinstance(obj, types.FunctionType):
        cells = tuple(fp(c.cell_contents) if _cell_filled(c) else "<empty>" for c in (obj.__closure__ or ()))
        return ("function", obj.__module__, obj.__qualname__, _code_fp(obj.__code__), fp(obj.__defaults__),
                fp(obj.__kwdefaults__), cells)
    if isinstance(obj, (types.BuiltinFunctionType, types.ModuleType, type)):
        name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        return (type(obj).__name__, getattr(obj, "__module__", None), name)
    if isinstance(obj, nn.Module):
        return ("module", _qualname(obj), repr(obj), _state_digest(obj))
    if hasattr(obj, "__dict__"):
        return ("object", _qualname(obj), fp(vars(obj)))
    return ("repr", _qualname(obj), repr(obj))


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(_tensor_digest(t).encode())
    return h.hexdigest()


def _is_default_ce(loss_fn: LossFn | None) -> bool:
    if loss_fn is None:
        return True
    from . import losses

    return loss_fn is losses.cross_entropy


# ---------------------------------------------------------------------------------------------- cache


def cache_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cache: str, loss_fn: LossFn | None = None,
              optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
              epochs: int = 10, batch_size: int = 128, sampler: str = "shuffle", seed: int = 0,
              lr_schedule: str | Callable[[int], float] | None = None, until_zero_error: bool = False,
              max_steps: int | None = None, callbacks: Sequence[Callback] = (),
              device: str | torch.device | None = None, progress: bool | None = None,
              augment: str | Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None) -> str:
    """The sha256 cache key :func:`fit` uses for the same arguments (call it with ``fit``'s keyword arguments).

    Hashes: the model's class and repr, its *current* (initial) state dict, x and y (shape, dtype, bytes),
    every hyperparameter (the augmentation included), the loss function (qualname, bytecode, closure values / partial arguments;
    ``None`` ≡ ``losses.cross_entropy``), the lr schedule, the callbacks (their values go into the cached
    history), the tag ``cache`` and a format version. Not hashed: ``device`` and ``progress`` (a model
    trained on a GPU is reused on the CPU) and module-level globals a loss reads. Mutable objects captured by a
    loss or callback (a counter, a list being filled) are hashed with their current contents.
    """
    del device, progress  # accepted so that fit's keyword arguments can be passed unchanged
    x = _as_x(x)
    y = _as_y(y, x.shape[0])
    parts = {
        "format": _CACHE_FORMAT,
        "model": (_qualname(model), repr(model), _state_digest(model)),
        "x": _tensor_digest(x),
        "y": _tensor_digest(y),
        "loss_fn": "cross_entropy[default]" if _is_default_ce(loss_fn) else _fingerprint(loss_fn),
        "hyper": dict(optimizer=optimizer, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                      epochs=int(epochs), batch_size=int(batch_size), sampler=sampler, seed=int(seed),
                      until_zero_error=bool(until_zero_error),
                      max_steps=None if max_steps is None else int(max_steps)),
        "lr_schedule": _fingerprint(_parse_schedule(lr_schedule)),
        "callbacks": _fingerprint(tuple(callbacks)),
        "tag": str(cache),
    }
    if augment is not None:  # only when given, so the keys of runs without augmentation stay what they were
        parts["augment"] = _fingerprint(_augmenter(augment))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def training_forbidden() -> bool:
    """Whether ``$MARGINLAB_FORBID_TRAINING`` is set (1/true/yes): a :func:`fit` with a cache tag then raises
    ``RuntimeError`` on a cache miss instead of training, so a chapter run after its job plan proves that the plan
    covered every model. Fits without a cache tag (tiny models trained in place) are not affected."""
    return os.environ.get("MARGINLAB_FORBID_TRAINING", "").strip().lower() in ("1", "true", "yes")


def cache_path(key: str, root: str | os.PathLike | None = None) -> Path:
    """Where the cache entry ``key`` lives: ``config.cache_dir()/<key>.pt``."""
    return config.cache_dir(root) / f"{key}.pt"


def _to_storable(value: Any) -> Any:
    """History values in a form ``torch.load(weights_only=True)`` accepts (numpy arrays tagged for round trip)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_to_storable(v) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        return {str(k): _to_storable(v) for k, v in value.items()}
    raise TypeError(f"cannot cache a history value of type {type(value).__name__}")


def _from_storable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        if set(value) == {"__tuple__"}:
            return tuple(_from_storable(v) for v in value["__tuple__"])
        return {k: _from_storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_storable(v) for v in value]
    return value


def _load_cached(path: Path, key: str, model: nn.Module) -> History | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("key") != key:
            raise ValueError("key mismatch")
        history = History(rows=_from_storable(blob["rows"]), meta=_from_storable(blob["meta"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # a truncated / corrupt / foreign file: retrain and overwrite it
        warnings.warn(f"ignoring unreadable cache file {path} ({type(err).__name__}: {err}); retraining", stacklevel=3)
        return None
    history.meta.update(cached=True, cache_file=str(path))
    return history


def _save_cached(path: Path, key: str, model: nn.Module, history: History) -> None:
    try:
        blob = {
            "key": key,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "rows": _to_storable(history.rows),
            "meta": _to_storable({k: v for k, v in history.meta.items() if k != "cached"}),
        }
    except TypeError as err:
        warnings.warn(f"not caching this run: {err}", stacklevel=3)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())  # the data reach the disk before the rename publishes the file (crash, NFS)
        os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- training


def _make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":  # coupled L2 weight decay, as torch.optim.Adam
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _lr_factor(schedule: str | Callable[[int], float] | None, epoch: int, epochs: int) -> float:
    if schedule is None:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if callable(schedule):
        return float(schedule(epoch))
    raise ValueError(f"lr_schedule must be None, 'cosine' or a callable(epoch) -> factor, got {schedule!r}")


@dataclass(frozen=True)
class StepSchedule:
    """Learning-rate factor ``gamma ** (epoch // every)``: a step decay every ``every`` epochs.

    Xu, Li & Yang 2020 §4.1 (WRN-34-10 on CIFAR-10): Adam, lr 0.01, "decays with a factor of 0.9 for each 60
    training epoches", 400 epochs — ``StepSchedule(60, 0.9)``, or ``lr_schedule="step:60:0.9"`` in :func:`fit`.
    """

    every: int
    gamma: float

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(f"every must be a positive int (epochs), got {self.every!r}")
        if not (isinstance(self.gamma, numbers.Real) and 0 < self.gamma and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a positive finite factor, got {self.gamma!r}")

    def __call__(self, epoch: int) -> float:
        return float(self.gamma) ** (int(epoch) // int(self.every))


def step_schedule(every: int, gamma: float) -> StepSchedule:
    """The step decay ``lr · gamma^(epoch // every)`` as an ``lr_schedule`` for :func:`fit`."""
    return StepSchedule(int(every) if isinstance(every, numbers.Integral) else every, float(gamma))


def _parse_schedule(schedule: Any) -> str | Callable[[int], float] | None:
    """None | "cosine" | "step:EVERY:GAMMA" (→ :class:`StepSchedule`) | a callable; anything else raises."""
    if schedule is None or schedule == "cosine" or (callable(schedule) and not isinstance(schedule, str)):
        return schedule
    if isinstance(schedule, str) and schedule.startswith("step:"):
        try:
            _, every, gamma = schedule.split(":")
            return StepSchedule(int(every), float(gamma))
        except ValueError as err:
            raise ValueError(f"lr_schedule {schedule!r}: write 'step:EVERY:GAMMA', e.g. 'step:60:0.9' ({err})") from None
    raise ValueError(
        f"lr_schedule must be None, 'cosine', 'step:EVERY:GAMMA' or a callable(epoch) -> factor, got {schedule!r}"
    )


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random ``padding``-pixel-padded crop + random horizontal flip of a batch of images (N, C, H, W),
    the CIFAR augmentation of He et al. 2016 and Zagoruyko & Komodakis 2016, used by Xu, Li & Yang 2020 §4.1
    ("4-pixel padding with 32×32 random crop and horizontal flip").

    Batched on ``x``'s device: one offset pair and one coin per image, drawn from ``generator`` (which must
    live on that device; None: the global RNG). Zero padding, as torchvision's ``RandomCrop(32, padding=4)``
    applied before normalisation. Returns a new tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"crop_flip needs a batch of images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    flip = torch.randint(0, 2, (n,), device=dev, generator=generator).bool()
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # (n, h)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w), ox[:, None] + ar_w)  # (n, w), reversed = flip
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


#: Training recipes quoted from the papers (keyword arguments of :func:`fit`).
RECIPES: dict[str, dict[str, Any]] = {
    # Xu, Li & Yang 2020 §4.1 (Tables 2-3, WRN-34-10 on CIFAR-10/100): "All clean images are normalized and
    # transformed by 4-pixel padding with 32×32 random crop and horizontal flip. [...] We apply the Adam
    # optimizer with an initial learning rate of 0.01 which decays with a factor of 0.9 for each 60 training
    # epoches, and run 400 epochs". The batch size is not stated for WRN; 128 is §4.2's (small nets) and
    # TRADES'. Normalisation lives in the model (models.WideResNet(normalize=...)).
    "xu_li_yang_2020_wrn": dict(optimizer="adam", lr=0.01, lr_schedule=StepSchedule(60, 0.9), epochs=400,
                                batch_size=128, augment="crop_flip"),
    # Xu, Li & Yang 2020 §4.2 (Tables 4-5, the small C&W nets): Adam, lr 0.01, 400 epochs, batch 128, no
    # augmentation.
    "xu_li_yang_2020_small": dict(optimizer="adam", lr=0.01, epochs=400, batch_size=128),
}


def recipe(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of :data:`RECIPES` ``[name]`` with ``overrides`` (e.g. ``epochs=`` for a shorter profile):
    ``fit(model, x, y, **recipe("xu_li_yang_2020_wrn"))``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return {**RECIPES[name], **overrides}


def _augmenter(augment: Any) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None:
    if augment is None:
        return None
    if augment == "crop_flip":
        return crop_flip
    if callable(augment) and not isinstance(augment, str):
        return augment
    raise ValueError(f"augment must be None, one of {AUGMENTATIONS} or a callable(xb, generator) -> xb, "
                     f"got {augment!r}")


def _device_generator(dev: torch.device, seed: int) -> torch.Generator | None:
    """A generator on ``dev`` seeded with ``seed`` (None where the device has none: the forked global RNG)."""
    try:
        return torch.Generator(device=dev).manual_seed(seed)
    except (RuntimeError, TypeError):
        return None


def _shuffle_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    batches = list(perm.split(batch_size))
    # a final batch of one example breaks BatchNorm in train mode; drop it (it is reshuffled next epoch)
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def _balanced_batches(groups: Sequence[torch.Tensor], half: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Each batch: ``half`` indices of each class. An epoch is ceil(max class size / half) batches; each class's
    indices are drawn as consecutive fresh permutations, so the larger class is seen once per epoch (its last
    batch topped up from a new permutation) and the smaller class is cycled. ``groups`` are in ``torch.unique``
    order of the label values. ``differential.pair_usage`` replays this function with the same generator: keep
    ``gen`` used by the sampler only."""
    n_batches = math.ceil(max(int(g.numel()) for g in groups) / half)
    need = n_batches * half
    streams = []
    for g in groups:
        reps = math.ceil(need / g.numel())
        stream = torch.cat([g[torch.randperm(g.numel(), generator=gen)] for _ in range(reps)])[:need]
        streams.append(stream.view(n_batches, half))
    return list(torch.cat(streams, dim=1).unbind(0))


def _progress_enabled(progress: bool | None) -> bool:
    """``progress`` if given; else ``$MARGINLAB_PROGRESS`` (1/0: set by ``python -m marginlab run`` for the chapter's
    kernel, whose bars it forwards to the terminal); else on in a terminal without ``$CI``."""
    if progress is not None:
        return bool(progress)
    forced = os.environ.get("MARGINLAB_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no") or os.environ.get("CI"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable[Any], **kw: Any) -> Any:
    """A tqdm bar: plain text on stderr when ``$MARGINLAB_PROGRESS=1`` (a headless run forwards it to the terminal),
    else ``tqdm.auto`` (a widget in a notebook)."""
    if os.environ.get("MARGINLAB_PROGRESS", "").strip().lower() in ("1", "true", "yes"):
        from tqdm import tqdm

        return tqdm(iterable, file=sys.stderr, dynamic_ncols=False, ncols=100, **kw)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _validate(model, x, y, optimizer, lr, momentum, weight_decay, epochs, batch_size, sampler, seed, max_steps,
              callbacks, lr_schedule, cache, augment):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if not (isinstance(lr, numbers.Real) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if max_steps is not None and (not isinstance(max_steps, numbers.Integral) or max_steps < 0):
        raise ValueError(f"max_steps must be None or a non-negative int, got {max_steps!r}")
    if not all(callable(cb) for cb in callbacks):
        raise TypeError("callbacks must be callables cb(epoch, model) -> dict")
    _parse_schedule(lr_schedule)
    _augmenter(augment)
    if cache is not None and (not isinstance(cache, str) or not cache):
        raise ValueError(f"cache must be None or a non-empty tag string, got {cache!r}")
    if sampler == "balanced" and batch_size < 2:
        raise ValueError("sampler='balanced' needs batch_size >= 2 (batch_size // 2 examples per class)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")


def _check_label_range(model: nn.Module, x: torch.Tensor, y_idx: torch.Tensor, dev: torch.device) -> None:
    """Class indices must be below the model's number of logits (one eval forward of one input)."""
    with eval_mode(model), torch.no_grad():
        out = model(x[:1].to(dev))
    k = 2 if out.dim() == 1 or out.shape[-1] == 1 else out.shape[-1]
    top = int(y_idx.max())
    if top >= k:
        raise ValueError(f"labels y go up to class {top}, but the model has {k} outputs (classes 0..{k - 1})")


def _run_callbacks(callbacks: Sequence[Callback], epoch: int, model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not callbacks:
        return out
    with eval_mode(model), torch.no_grad():
        for cb in callbacks:
            res = cb(epoch, model)
            if res is None:
                continue
            if not isinstance(res, dict):
                raise TypeError(f"callback {getattr(cb, '__name__', cb)!r} must return a dict or None, "
                                f"got {type(res).__name__}")
            out.update({k: v for k, v in res.items() if k != "epoch"})
    return out


class _LogitTap:
    """Captures the logits of a custom loss's single forward through ``module`` (for the training accuracy)."""

    def __init__(self, module: nn.Module | None):
        self.calls, self.out = 0, None
        self.handle = module.register_forward_hook(self._hook) if module is not None else None

    def _hook(self, _module, _inputs, output):
        self.calls += 1
        self.out = output.detach() if isinstance(output, torch.Tensor) else None

    def reset(self) -> None:
        self.calls, self.out = 0, None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _logit_module(model: nn.Module) -> nn.Module:
    """The module whose output is the logits: the registered ``head`` if any (it sees the logits whether a loss
    calls ``model(x)`` or ``model.head(model.features(x))``), else the model itself."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and any(head is m for m in model.modules()):
        return head
    return model


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
        optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
        epochs: int = 10, batch_size: int = 128, sampler: str = "shuffle", seed: int = 0,
        device: str | torch.device | None = None, callbacks: Sequence[Callback] = (), cache: str | None = None,
        progress: bool | None = None, lr_schedule: str | Callable[[int], float] | None = None,
        until_zero_error: bool = False, max_steps: int | None = None,
        augment: str | Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None) -> History:
    """Train ``model`` in place on (x, y) by mini-batch gradient descent and return its :class:`History`.

    Args:
        loss_fn: ``loss_fn(model, xb, yb) -> scalar`` (or ``(scalar, logits)``); default: softmax cross-entropy
            on ``model(xb)`` with ±1 labels mapped to classes {0, 1}. Custom losses get the labels unchanged.
        optimizer: "sgd" | "momentum" (SGD, ``momentum``) | "nesterov" | "adam" | "adamw"; ``weight_decay`` is
            passed to the optimiser (coupled L2 for sgd/momentum/nesterov/adam).
        epochs: number of passes (the maximum with ``until_zero_error``); ``max_steps`` stops after that many
            optimiser steps (mid-epoch; the partial epoch is recorded).
        sampler: "shuffle" (a fresh permutation per epoch; a trailing batch of one example is dropped because it
            breaks BatchNorm) or "balanced": exactly two label values, each batch holds ``batch_size // 2``
            examples of each; an epoch is ceil(max class size / (batch_size // 2)) batches, the smaller class
            cycled (fresh permutations) — for pairwise/differential losses (Nar et al. 2019a, §4).
        seed: seeds the batch order (CPU generator) and, via ``fork_rng``, dropout / randomness inside the loss.
            It does not re-initialise the model: seed before constructing it.
        device: where training runs (default ``config.device()``); the model is moved there and stays there.
        callbacks: ``cb(epoch, model) -> dict`` at epoch 0 (before training) and after every epoch, with the model
            in eval mode under ``no_grad`` (use ``torch.enable_grad()`` inside for attacks); merged into the rows.
            Return values rather than appending to outside lists: on a cache hit callbacks are not called and the
            cached history (with their values) is returned.
        cache: a tag; if given, the trained weights and history are cached under :func:`cache_key` and a hit loads
            them instead of training (``history.cached`` is True); a miss raises ``RuntimeError`` when
            ``$MARGINLAB_FORBID_TRAINING`` is set (:func:`training_forbidden`).
        progress: tqdm bar over epochs; default on only in a terminal without ``$CI``.
        lr_schedule: None, "cosine" (per epoch, from lr to 0), "step:EVERY:GAMMA" (:class:`StepSchedule`, e.g.
            "step:60:0.9" for Xu, Li & Yang 2020) or ``f(epoch) -> factor`` (epoch = 0, 1, ... of the epoch about to
            be trained); the row's ``lr`` is the rate used in that epoch.
        augment: None, "crop_flip" (:func:`crop_flip`: pad-4 random crop + horizontal flip, batched on the device)
            or ``f(xb, generator) -> xb``; applied to every training batch with a generator on the training device
            seeded by ``seed``. ``train_acc`` is then measured on the augmented batches; ``train_err`` and the
            callbacks see the original data. Part of the cache key.
        until_zero_error: after each epoch measure the exact training error (eval mode) as ``train_err`` and stop
            once it is 0 ("train to zero training error", as Nar et al. 2019a,b and Wu & Yu 2019 do).

    Device boundary: the data are moved to ``device`` once and stay resident there for the run; batches are
    index gathers on the device; the only host synchronisations are one per epoch (the epoch's loss, and the
    exact training error with ``until_zero_error``). An interrupted run writes nothing to the cache (the cache
    file appears atomically, complete, after the last epoch).

    The model's train/eval flags are restored at the end. Returns the :class:`History`.
    """
    _validate(model, x, y, optimizer, lr, momentum, weight_decay, epochs, batch_size, sampler, seed, max_steps,
              callbacks, lr_schedule, cache, augment)
    lr_schedule = _parse_schedule(lr_schedule)
    epochs, batch_size, seed, lr = int(epochs), int(batch_size), int(seed), float(lr)
    max_steps = None if max_steps is None else int(max_steps)
    x = _as_x(x)
    y = _as_y(y, x.shape[0])
    default_ce = _is_default_ce(loss_fn)
    y_idx = class_indices(y)  # validates ±1 labels; used for accuracies (and the default loss)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values; clean the inputs before training")
    groups: list[torch.Tensor] = []
    if sampler == "balanced":
        values = torch.unique(y)
        if values.numel() != 2:
            raise ValueError(f"sampler='balanced' needs exactly two label values, found {values.tolist()}")
        groups = [torch.nonzero(y == v).view(-1) for v in values]

    dev = config.device(device)
    key = None
    if cache is not None:
        key = cache_key(model, x, y, cache=cache, loss_fn=loss_fn, optimizer=optimizer, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, sampler=sampler, seed=seed,
                        lr_schedule=lr_schedule, until_zero_error=until_zero_error, max_steps=max_steps,
                        callbacks=callbacks, augment=augment)
    model.to(dev)
    if default_ce:
        _check_label_range(model, x, y_idx, dev)
    if key is not None:
        hit = _load_cached(cache_path(key), key, model)
        if hit is not None:
            return hit
        if training_forbidden():
            raise RuntimeError(
                f"MARGINLAB_FORBID_TRAINING is set and the model cached as {cache!r} is not in the cache "
                f"({cache_path(key)}); train it first (python -m marginlab jobs CHAPTER --run) or unset the variable")

    modes = [(m, m.training) for m in model.modules()]
    start = time.perf_counter()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        history = _train(model, x, y, y_idx, groups, dev, loss_fn, default_ce, optimizer, lr, momentum, weight_decay,
                         epochs, batch_size, sampler, seed, callbacks, progress, lr_schedule, until_zero_error,
                         max_steps, _augmenter(augment))
    for m, flag in modes:
        m.training = flag
    history.meta.update(seconds=round(time.perf_counter() - start, 3), key=key, cached=False, device=str(dev),
                        cache_file=str(cache_path(key)) if key is not None else None)
    if key is not None:
        _save_cached(cache_path(key), key, model, history)
    return history


def _train(model, x, y, y_idx, groups, dev, loss_fn, default_ce, optimizer, lr, momentum, weight_decay, epochs,
           batch_size, sampler, seed, callbacks, progress, lr_schedule, until_zero_error, max_steps,
           augment) -> History:
    dtype = _model_dtype(model)
    xd = x.to(dev, dtype=dtype)  # resident for the whole run: batches are index gathers
    yd = (y_idx if default_ce else y).to(dev)
    yid = y_idx.to(dev)
    gen = torch.Generator().manual_seed(seed)  # the batch order: CPU, replayed by differential.pair_usage
    aug_gen = _device_generator(dev, seed) if augment is not None else None
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    tap = None if default_ce else _LogitTap(_logit_module(model))
    history = History(rows=[{"epoch": 0, **_run_callbacks(callbacks, 0, model)}])
    steps, stopped = 0, "epochs"
    bar = None
    epoch_iter: Iterable[int] = range(1, epochs + 1)
    if _progress_enabled(progress):
        bar = progress_bar(epoch_iter, total=epochs, desc=f"fit {type(model).__name__}", leave=False)
        epoch_iter = bar
    try:
        for epoch in epoch_iter:
            if max_steps is not None and steps >= max_steps:
                stopped = "max_steps"
                break
            lr_now = lr * _lr_factor(lr_schedule, epoch - 1, epochs)
            for g in opt.param_groups:
                g["lr"] = lr_now
            model.train()
            order = (_balanced_batches(groups, batch_size // 2, gen) if sampler == "balanced"
                     else _shuffle_batches(x.shape[0], batch_size, gen))
            # the epoch's indices cross to the device in one copy; batches are views of it
            batches = torch.cat(order).to(dev, non_blocking=True).split([int(b.numel()) for b in order])
            loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
            correct = torch.zeros((), device=dev, dtype=torch.int64)
            seen, have_logits = 0, True
            for idx in batches:
                threads.balance()
                xb, yb = xd[idx], yd[idx]
                if augment is not None:
                    xa = augment(xb, aug_gen)
                    if not isinstance(xa, torch.Tensor) or xa.shape != xb.shape:
                        raise ValueError(f"augment must return a tensor of the batch's shape {tuple(xb.shape)}, "
                                         f"got {tuple(xa.shape) if isinstance(xa, torch.Tensor) else type(xa).__name__}")
                    xb = xa
                logits = None
                if default_ce:
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                else:
                    tap.reset()
                    out = loss_fn(model, xb, yb)
                    if isinstance(out, (tuple, list)):
                        loss, logits = out[0], out[1]
                    else:
                        loss = out
                        if tap.calls == 1 and tap.out is not None and tap.out.shape[:1] == xb.shape[:1]:
                            logits = tap.out
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                     f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                n_b = int(idx.numel())
                loss_sum += loss.detach().double() * n_b
                if logits is not None and have_logits:
                    correct += (_predicted_class(logits.detach()) == yid[idx]).sum()
                else:
                    have_logits = False
                seen += n_b
                if max_steps is not None and steps >= max_steps:
                    break
            mean_loss = float(loss_sum) / max(seen, 1)  # the one host sync of the epoch
            row: dict[str, Any] = {"epoch": epoch, "loss": mean_loss,
                                   "train_acc": float(correct) / max(seen, 1) if have_logits else math.nan,
                                   "lr": lr_now, "steps": steps}
            if until_zero_error:
                row["train_err"] = 1.0 - accuracy(model, xd, yid, batch_size=max(EVAL_BATCH_SIZE, batch_size),
                                                  device=dev)
            row.update(_run_callbacks(callbacks, epoch, model))
            history.rows.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4g}", acc=f"{row['train_acc']:.3f}")
            if not math.isfinite(mean_loss):
                warnings.warn(f"training diverged at epoch {epoch} (loss {mean_loss}); stopping", stacklevel=3)
                stopped = "diverged"
                break
            if until_zero_error and row["train_err"] == 0.0:
                stopped = "zero_error"
                break
            if max_steps is not None and steps >= max_steps:
                stopped = "max_steps"
                break
    finally:
        if tap is not None:
            tap.remove()
        if bar is not None:
            bar.close()
    history.meta.update(steps=steps, stopped=stopped)
    return history
