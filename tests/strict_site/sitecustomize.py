"""Turn the device-strict test mode on in this interpreter when ``MARGINLAB_DEVICE_STRICT=1``.

Put this directory on ``PYTHONPATH`` as an absolute path (``PYTHONPATH=$PWD/tests/strict_site``: a
chapter's kernel starts in ``chapters/``, where a relative entry finds nothing) for a subprocess or a
Jupyter kernel; with the variable unset or ``0`` nothing happens. ``tests/device_strict.py`` is imported by path
and registered as the module ``device_strict``, so that tests importing it share its classes. Set
``MARGINLAB_DEVICE=meta`` too, so that ``marginlab.config.device()`` picks the stand-in device.
With ``MARGINLAB_DEVICE_STRICT_LOG=FILE`` every interpreter that turned the mode on appends a line
(pid and command line) to FILE: how a test proves that a kernel started by a runner got the mode.
"""
from __future__ import annotations

import os


def _activate() -> None:
    flag = os.environ.get("MARGINLAB_DEVICE_STRICT", "").strip().lower()
    if flag in ("", "0", "false", "no"):
        return
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "device_strict.py"
    module = sys.modules.get("device_strict")
    if module is None:
        spec = importlib.util.spec_from_file_location("device_strict", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["device_strict"] = module
        spec.loader.exec_module(module)
    module.enable()
    log = os.environ.get("MARGINLAB_DEVICE_STRICT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {' '.join(getattr(sys, 'orig_argv', sys.argv))}\n")


_activate()
