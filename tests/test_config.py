"""Profiles: quick by default on any hardware, standard and smoke resolved by ``pick``."""
from __future__ import annotations

import pytest
import torch

from marginlab import config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MARGINLAB_PROFILE", "MARGINLAB_SMOKE", "MARGINLAB_DEVICE"):
        monkeypatch.delenv(var, raising=False)


def test_default_is_quick_even_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.profile() == "quick"
    assert config.run_name() == "quick"


@pytest.mark.parametrize(
    ("profile", "smoke", "expected", "name"),
    [
        ("quick", "", 1, "quick"),
        ("standard", "", 3, "standard"),
        ("full", "", 2, "full"),
        ("full", "1", 4, "smoke"),
    ],
)
def test_pick_and_run_name(monkeypatch, profile, smoke, expected, name):
    monkeypatch.setenv("MARGINLAB_PROFILE", profile)
    monkeypatch.setenv("MARGINLAB_SMOKE", smoke)
    assert config.pick(quick=1, full=2, standard=3, smoke=4) == expected
    assert config.run_name() == name


@pytest.mark.parametrize("profile", ["standard", "full"])
def test_standard_and_smoke_default_to_full(monkeypatch, profile):
    monkeypatch.setenv("MARGINLAB_PROFILE", profile)
    assert config.pick(quick=1, full=2) == 2
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    monkeypatch.setenv("MARGINLAB_SMOKE", "1")
    assert config.pick(quick=1, full=2) == 2


def test_smoke_needs_full(monkeypatch):
    monkeypatch.setenv("MARGINLAB_SMOKE", "1")
    with pytest.raises(ValueError, match="MARGINLAB_PROFILE=full"):
        config.smoke()
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    monkeypatch.setenv("MARGINLAB_SMOKE", "maybe")
    with pytest.raises(ValueError, match="MARGINLAB_SMOKE"):
        config.smoke()
