"""Scorecard: verdicts are computed by rules, results files carry provenance and are written atomically."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marginlab import config, scorecard
from marginlab.scorecard import NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED, Scorecard


@pytest.mark.parametrize(
    "rule, value, verdict",
    [
        (scorecard.at_least(0.9, partly=0.8), 0.95, REPRODUCED),
        (scorecard.at_least(0.9, partly=0.8), 0.85, PARTLY),
        (scorecard.at_least(0.9, partly=0.8), 0.5, NOT_REPRODUCED),
        (scorecard.at_most(2), 2, REPRODUCED),
        (scorecard.at_most(2), 3, NOT_REPRODUCED),
        (scorecard.within(93.65, 1.0, partly=3.0), 94.1, REPRODUCED),
        (scorecard.within(93.65, 1.0, partly=3.0), 91.0, PARTLY),
        (scorecard.is_true(), np.bool_(False), NOT_REPRODUCED),
        (scorecard.fraction_true(), 1.0, REPRODUCED),
        (scorecard.at_least(1.0), None, NOT_RUN),
        (scorecard.at_least(1.0), math.nan, NOT_RUN),
    ],
)
def test_rules_compute_verdicts(rule, value, verdict):
    assert rule(value) == verdict


def test_rule_must_return_a_known_verdict():
    bad = scorecard.Rule("always fine", lambda v: "fine")
    with pytest.raises(ValueError, match="not one of"):
        bad(1.0)


def test_save_writes_json_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    sc = Scorecard("99_example", seeds=[0, 1])
    sc.claim("acc", "clean accuracy", paper=93.65, ours=torch.tensor(94.0), rule=scorecard.within(93.65, 1.0))
    sc.record("curve", np.array([1.0, 0.5, np.nan]))
    path = sc.save(root=tmp_path)
    assert path == tmp_path / "quick" / "99_example.json"
    data = json.loads(path.read_text())
    assert data["claims"][0]["verdict"] == REPRODUCED and data["claims"][0]["ours"] == pytest.approx(94.0)
    assert data["records"]["curve"] == [1.0, 0.5, None]
    prov = data["provenance"]
    assert prov["seeds"] == [0, 1] and prov["seconds"] >= 0 and prov["device"] == str(config.device())
    assert "commit" in prov and prov["profile"] == "quick"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_table_shows_stored_full_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    full = Scorecard("99_example")
    full.claim("rank", "rank of features", paper=2, ours=2, rule=scorecard.at_most(2))
    full.save(root=tmp_path)
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    live = Scorecard("99_example")
    live.claim("rank", "rank of features", paper=2, ours=5, rule=scorecard.at_most(2))
    live.claim("other", "a claim only run live", paper=1.0, ours=1.0, rule=scorecard.at_least(1.0))
    rows = live.rows(root=tmp_path)
    assert rows[0]["ours (full, stored)"] == "2" and rows[0]["verdict"] == "not reproduced (live); reproduced (full)"
    assert rows[1]["ours (full, stored)"] == "not run"
    md = live.to_markdown(root=tmp_path)
    assert md.splitlines()[0].startswith("| claim | paper | ours (live) | ours (full, stored) | verdict")
    live.save(root=tmp_path)
    book = scorecard.book_rows(root=tmp_path)
    assert [r["verdict (quick / full)"] for r in book] == ["not reproduced / reproduced", "reproduced / not run"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "r.json"
    scorecard.atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        scorecard.atomic_write_text(target, object())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_bad_chapter_name():
    with pytest.raises(ValueError):
        Scorecard("a/b")


def test_profile_and_device(monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    assert config.profile() == "full" and config.pick(quick=1, full=2) == 2
    monkeypatch.setenv("MARGINLAB_PROFILE", "fast")
    with pytest.raises(ValueError, match="MARGINLAB_PROFILE"):
        config.profile()
    monkeypatch.setenv("MARGINLAB_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")


def test_seed_everything_is_deterministic():
    config.seed_everything(3)
    a = torch.randn(4)
    config.seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    with pytest.raises(ValueError):
        config.seed_everything(-1)
