"""Scorecard: verdicts are computed by rules, results files carry provenance and are written atomically."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marginlab import config, scorecard
from marginlab.scorecard import NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED, Scorecard
from marginlab.stats import Estimate


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


@pytest.mark.parametrize(
    "rule, low, high, verdict",
    [
        # at_least(90): all of the interval above -> reproduced; straddling -> partly; all below -> not.
        (scorecard.at_least(90), 91.0, 95.0, REPRODUCED),
        (scorecard.at_least(90), 88.0, 94.0, PARTLY),
        (scorecard.at_least(90), 82.0, 88.0, NOT_REPRODUCED),
        (scorecard.at_least(90), 82.0, 90.0, PARTLY),  # closed bands: touching the threshold counts
        (scorecard.at_least(90, partly=80), 82.0, 88.0, PARTLY),  # wholly in the partly band
        (scorecard.at_least(90, partly=80), 70.0, 79.0, NOT_REPRODUCED),
        (scorecard.at_most(2, partly=4), 1.0, 2.0, REPRODUCED),
        (scorecard.at_most(2, partly=4), 3.0, 5.0, PARTLY),
        (scorecard.at_most(2, partly=4), 4.5, 5.0, NOT_REPRODUCED),
        (scorecard.within(93.65, 1.0, partly=3.0), 93.0, 94.5, REPRODUCED),
        (scorecard.within(93.65, 1.0, partly=3.0), 92.0, 95.0, PARTLY),
        (scorecard.within(93.65, 1.0), 95.0, 99.0, NOT_REPRODUCED),
        (scorecard.within(93.65, 1.0), 90.0, 99.0, PARTLY),  # contains the whole band
        (scorecard.fraction_true(1.0, 0.5), 0.2, 0.4, NOT_REPRODUCED),
    ],
)
def test_rules_judge_whole_intervals(rule, low, high, verdict):
    # The point value sits at an end on purpose: only the interval decides.
    assert rule(Estimate(low, low, high)) == verdict
    assert rule(Estimate(high, low, high)) == verdict


def test_comparison_rules():
    ce = Estimate(93.0, 90.0, 96.0)
    assert scorecard.greater_than(ce)(Estimate(98.0, 96.5, 99.0)) == REPRODUCED
    assert scorecard.greater_than(ce)(Estimate(95.0, 92.0, 97.0)) == PARTLY
    assert scorecard.greater_than(ce)(Estimate(85.0, 80.0, 89.0)) == NOT_REPRODUCED
    assert scorecard.less_than(ce)(Estimate(85.0, 80.0, 89.0)) == REPRODUCED
    assert scorecard.less_than(ce)(Estimate(98.0, 96.5, 99.0)) == NOT_REPRODUCED
    # A paired difference against 0, and plain numbers.
    assert scorecard.greater_than(0.0)(Estimate(0.02, 0.01, 0.03, method="bootstrap-paired")) == REPRODUCED
    assert scorecard.greater_than(0.0)(Estimate(0.01, -0.01, 0.03, method="bootstrap-paired")) == PARTLY
    assert scorecard.greater_than(3.0)(4.0) == REPRODUCED and scorecard.greater_than(3.0)(3.0) == NOT_REPRODUCED
    assert scorecard.less_than(3.0)(2) == REPRODUCED and scorecard.greater_than(ce)(94.0) == PARTLY
    assert scorecard.greater_than(ce, what="CE").description == "ours > CE (intervals disjoint)"
    with pytest.raises(ValueError, match="other"):
        scorecard.greater_than("CE")  # type: ignore[arg-type]


def test_boolean_rules_refuse_intervals():
    with pytest.raises(ValueError, match="interval"):
        scorecard.is_true()(Estimate(1.0, 0.0, 1.0))


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
    assert prov["threads"] == torch.get_num_threads() and "data_sizes" in prov
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_table_shows_stored_runs_in_three_profile_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    full = Scorecard("99_example")
    full.claim("rank", "rank of features", paper=2, ours=2, rule=scorecard.at_most(2))
    full.save(root=tmp_path)
    monkeypatch.setenv("MARGINLAB_PROFILE", "standard")
    std = Scorecard("99_example")
    std.claim("rank", "rank of features", paper=2, ours=3, rule=scorecard.at_most(2, partly=4))
    std.save(root=tmp_path)
    monkeypatch.setenv("MARGINLAB_PROFILE", "quick")
    live = Scorecard("99_example")
    live.claim("rank", "rank of features", paper=2, ours=5, rule=scorecard.at_most(2))
    live.claim("other", "a claim only run live", paper=1.0, ours=1.0, rule=scorecard.at_least(1.0))
    rows = live.rows(root=tmp_path)
    assert list(rows[0]) == ["claim", "paper", "quick (live)", "standard", "full", "rule"]
    assert rows[0]["quick (live)"] == "5 (not reproduced)"
    assert rows[0]["standard"] == "3 (partly)" and rows[0]["full"] == "2 (reproduced)"
    assert rows[1]["standard"] == NOT_RUN and rows[1]["full"] == NOT_RUN
    md = live.to_markdown(root=tmp_path)
    assert md.splitlines()[0] == "| claim | paper | quick (live) | standard | full | rule |"
    html = live.to_html(root=tmp_path)
    assert html.count("<tr>") == 3 and "ml-v-partly" in html and "(live)" in html
    live.save(root=tmp_path)
    book = scorecard.book_rows(root=tmp_path)
    assert [(r["quick"], r["standard"], r["full"]) for r in book] == [
        ("5 (not reproduced)", "3 (partly)", "2 (reproduced)"), ("1 (reproduced)", NOT_RUN, NOT_RUN)]
    entries = scorecard.book_entries(root=tmp_path)
    assert entries[0]["results"]["standard"]["verdict"] == PARTLY and entries[1]["results"]["full"] is None


def test_smoke_runs_get_their_own_column(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGINLAB_PROFILE", "full")
    monkeypatch.setenv("MARGINLAB_SMOKE", "1")
    sc = Scorecard("99_example")
    sc.claim("a", "a claim", paper=1, ours=1, rule=scorecard.at_least(1))
    assert sc.profiles() == ["quick", "standard", "full", "smoke"]
    assert sc.rows(root=tmp_path)[0]["smoke (live)"] == "1 (reproduced)"
    assert sc.save(root=tmp_path) == tmp_path / "smoke" / "99_example.json"


def test_markdown_table_takes_the_union_of_columns():
    """Regression: chapter 6's Table 1 rows for MNIST and CIFAR have different eps columns."""
    rows = [{"model": "MNIST", "ε=0.5": 0.9, "ε=1": 0.8}, {"model": "CIFAR", "ε=0.1": 0.7, "ε=1": 0.6}]
    md = scorecard.markdown_table(rows).splitlines()
    assert md[0] == "| model | ε=0.5 | ε=1 | ε=0.1 |"
    assert md[2] == "| MNIST | 0.9 | 0.8 |  |" and md[3] == "| CIFAR |  | 0.6 | 0.7 |"


def test_values_that_display_oddly_never_raise():
    sc = Scorecard("99_example", profile="quick")
    sc.claim("odd", "a claim with a dict value", paper={"a": [1, 2]}, ours=np.array([1.5, np.nan]),
             rule=scorecard.Rule("always", lambda v: REPRODUCED))
    sc.claim("est", "a claim with an interval", paper=90.0, ours=Estimate(93.0, 91.0, 95.0),
             rule=scorecard.at_least(90))
    html = sc.to_html(root="/nonexistent")
    assert "[1.5, None]" in html and "93.0" in html and "[91.0, 95.0]" in html


def test_claims_name_their_paper():
    sc = Scorecard("01_two_point_dynamics", profile="quick")
    assert sc.claim("a", "001 Fig 1: angle", 90, 89, scorecard.at_least(80)).source == "001"
    assert sc.claim("b", "eq. 1 of 000: share", 1, 1, scorecard.at_least(1)).source == "000"
    assert sc.claim("c", "something at t = 1.001", 1, 1, scorecard.at_least(1)).source == "001"  # chapter's paper
    assert sc.claim("d", "x", 1, 1, scorecard.at_least(1), source="003").source == "003"
    with pytest.raises(ValueError, match="source"):
        sc.claim("e", "x", 1, 1, scorecard.at_least(1), source="Nar")


def test_chapter_titles_come_from_the_sources(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "03_low_rank.md").write_text("---\nkernelspec: {}\n---\n\n# Low-rank features\n")
    assert scorecard.chapter_title("03_low_rank", root=tmp_path) == "3. Low-rank features"
    assert scorecard.chapter_title("04_differential_training", root=tmp_path) == "4. Differential training"


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


def test_intervals_and_data_sizes_reach_the_results_file(tmp_path, monkeypatch):
    from marginlab import data

    monkeypatch.setattr(data, "loaded_sizes", lambda: {"cifar10": {"n_train": 1033, "n_test": 207}}, raising=False)
    sc = Scorecard("99_example", profile="standard")
    sc.claim("acc", "clean accuracy (%)", 93.65, Estimate(0.93, 0.90, 0.96, n=207).scaled(100),
             scorecard.within(93.65, 1.0, partly=3.0))
    data_ = json.loads(sc.save(root=tmp_path).read_text())
    assert data_["provenance"]["data_sizes"] == {"cifar10": {"n_train": 1033, "n_test": 207}}
    stored = data_["claims"][0]
    assert stored["verdict"] == PARTLY and Estimate.from_dict(stored["ours"]) == Estimate(93.0, 90.0, 96.0, n=207)
    assert scorecard.book_rows(root=tmp_path)[0]["standard"] == "93.0 [90.0, 96.0] (partly)"


def _two_chapters(tmp_path):
    for profile, ours in (("quick", 0.5), ("standard", 0.95)):
        sc = Scorecard("01_two_point_dynamics", profile=profile)
        sc.claim("a", "001 Fig 1: angle", 90, ours, scorecard.at_least(0.9, partly=0.4))
        sc.claim("b", "000 eq. 1: share", 1, ours, scorecard.at_least(0.9))
        sc.save(root=tmp_path)
    sc = Scorecard("05_angular_margin_penalty", profile="quick")
    sc.claim("c", "Table 4: accuracy (%)", 97.95, Estimate(96.0, 94.0, 98.0), scorecard.at_least(95.0))
    sc.save(root=tmp_path)
    return scorecard.book_entries(root=tmp_path)


def test_overview_counts_and_figure_come_from_the_results(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_hex

    from marginlab import overview

    entries = _two_chapters(tmp_path)
    counts = overview.verdict_counts(entries)
    assert counts["001"]["quick"] == {PARTLY: 1} and counts["001"]["standard"] == {REPRODUCED: 1}
    assert counts["000"]["quick"] == {NOT_REPRODUCED: 1} and counts["002"]["full"] == {NOT_RUN: 1}
    assert counts["002"]["quick"] == {PARTLY: 1}  # 96 [94, 98] straddles 95
    fig = overview.overview_figure(entries)
    assert [ax.get_title() for ax in fig.axes] == ["quick (live, CPU)", "standard (stored, CPU)",
                                                    "full (stored, GPU)\nno run stored"]
    # Bars: one row per (chapter, paper); their widths add up to the claims of each row.
    for ax in fig.axes:
        widths = {}
        for bar in ax.patches:
            widths.setdefault(round(bar.get_y() + bar.get_height() / 2), []).append(
                (bar.get_width(), to_hex(bar.get_facecolor())))
        assert sorted(sum(w for w, _ in row) for row in widths.values()) == [1, 1, 1]
    quick = {to_hex(b.get_facecolor()) for b in fig.axes[0].patches if b.get_width() > 0}
    assert quick == {scorecard.COLOURS[PARTLY], scorecard.COLOURS[NOT_REPRODUCED]}
    html = overview.counts_html(entries)
    assert html.count("<tr>") == 4 and "Xu et al. 2020" in html
    detail = overview.chapters_html(entries, root=tmp_path)
    assert 'href="../chapters/05_angular_margin_penalty.html"' in detail
    assert ">5. Angular margin penalty</a></h3>" in detail and "[94.0, 98.0]" in detail


def test_overview_without_results_says_so(tmp_path, monkeypatch):
    import IPython.display

    from marginlab import overview

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    overview.show(results=tmp_path)
    assert len(shown) == 1 and "No chapter has written results yet" in shown[0].data
    with pytest.raises(ValueError, match="parts"):
        overview.show(parts=("pie",), results=tmp_path)


def test_show_saves_first_and_survives_damaged_stored_files(tmp_path, monkeypatch):
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda *objs: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "99_example.json").write_text("{not json")
    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "99_example.json").write_text('{"claims": [{"id": "a"}, "junk"]}')
    sc = Scorecard("99_example", profile="quick")
    sc.claim("a", "a claim", 1, 1, scorecard.at_least(1))
    with pytest.warns(UserWarning, match="unreadable"):
        out = sc.show(root=tmp_path)
    assert (tmp_path / "quick" / "99_example.json").is_file()  # saved before anything was rendered
    assert "ml-v-reproduced" in out.data
    with pytest.warns(UserWarning, match="unreadable"):
        assert sc.entries(root=tmp_path)[0]["results"]["standard"]["verdict"] == NOT_RUN


def test_glue_stored_glues_each_stored_claim_and_its_verdict(tmp_path, monkeypatch):
    import myst_nb

    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.setdefault(name, value.data))
    sc = Scorecard(chapter="99_glue", profile="standard")
    sc.claim("k", "components", 2, Estimate(61.0, 55.0, 66.0, method="seeds", n=3), scorecard.at_most(2, partly=5))
    sc.save(tmp_path)
    results = scorecard.glue_stored("99_glue", "standard", root=tmp_path)
    assert results["claims"][0]["id"] == "k"
    assert glued == {"standard_k": "61 [55, 66]", "standard_k_verdict": "**not reproduced**"}
    glued.clear()
    assert scorecard.glue_stored("99_glue", "full", root=tmp_path) is None and glued == {}


def test_provenance_commit_is_dirty_for_code_changes_not_for_results_files(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "run.json").write_text("{}\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "init"], cwd=tmp_path, check=True)
    monkeypatch.setattr(config, "project_root", lambda: tmp_path)
    clean = scorecard._git_commit()
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results" / "run.json").write_text('{"a": 1}\n')  # a previous run's output
    assert scorecard._git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert scorecard._git_commit() == clean + "+dirty"
