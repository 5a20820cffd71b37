"""docs/walkthrough.md's tables come from a real run: regenerate them on 4 ranks and compare."""
import os

import pytest

from ringlab.teach.walkthrough import StepRecord
from ringlab.teach.walkthrough_figures import (GENERATED_BEGIN, GENERATED_END, extract_generated_section,
                                             render_walkthrough_figures, replace_generated_section,
                                             step_figure_names, walkthrough_markdown_tables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "walkthrough.md")


def test_committed_doc_matches_a_real_4_rank_run(run_mpi):
    res = run_mpi(4, "experiments/walkthrough.py", "--check", DOC, timeout=120, check=False)
    assert res.returncode == 0, f"docs/walkthrough.md drifted from the code:\n{res.stdout}\n{res.stderr}"
    assert "matches a real 4-rank run" in res.stdout


def test_committed_doc_links_existing_figures():
    with open(DOC, encoding="utf-8") as f:
        section = extract_generated_section(f.read())
    for name in step_figure_names(4):
        assert f"(img/{name})" in section
        assert os.path.exists(os.path.join(ROOT, "docs", "img", name)), name
    assert os.path.exists(os.path.join(ROOT, "docs", "img", "walkthrough_animation.gif"))


def test_check_detects_drift(run_mpi, tmp_path):
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    doc = tmp_path / "walkthrough.md"
    doc.write_text(text.replace("| a | a0 → b | d3 ← d |", "| a | a0 → c | d3 ← d |"), encoding="utf-8")
    res = run_mpi(4, "experiments/walkthrough.py", "--check", str(doc), timeout=120, check=False)
    assert res.returncode == 1 and "DRIFT" in res.stdout and "a0 → c" in res.stdout


def test_figures_from_a_real_3_rank_run(run_mpi, tmp_path):
    res = run_mpi(3, "tests/mpi/walkthrough_figures_check.py", str(tmp_path), timeout=120)
    assert "figures ok: 5 PNGs" in res.stdout and "5-frame GIF" in res.stdout


def _fake_records(n):
    """Records of a 2-rank run, hand-built: start, one reduce-scatter step, one all-gather step."""
    if n != 2:
        raise NotImplementedError
    return [[StepRecord("start", -1, 0, -1, -1, 0, -1, -1, [1, 1]),
             StepRecord("reduce-scatter", 0, 0, 1, 0, 1, 1, 1, [1, 3]),
             StepRecord("all-gather", 0, 0, 1, 1, 3, 1, 0, [3, 3])],
            [StepRecord("start", -1, 1, -1, -1, 0, -1, -1, [2, 2]),
             StepRecord("reduce-scatter", 0, 1, 0, 1, 2, 0, 0, [3, 2]),
             StepRecord("all-gather", 0, 1, 0, 0, 3, 0, 1, [3, 3])]]


def test_markdown_tables_mark_changed_and_complete_chunks():
    md = walkthrough_markdown_tables(_fake_records(2), image_dir="pics")
    assert "![reduce-scatter step 1 of 1](pics/walkthrough_step01_rs1.png)" in md
    assert "| a | a0 → b | b1 ← b | a0 | **a1+b1 ✔** |" in md
    assert "| b | b1 → a | a0 ← a | **a0+b0 ✔** | b1 |" in md


def test_replace_generated_section_keeps_prose_and_requires_markers():
    doc = f"intro\n{GENERATED_BEGIN}\nold\n{GENERATED_END}\noutro\n"
    new = replace_generated_section(doc, "new\n")
    assert new == f"intro\n{GENERATED_BEGIN}\nnew\n{GENERATED_END}\noutro\n"
    assert extract_generated_section(new) == "new\n"
    with pytest.raises(ValueError, match="no generated section"):
        replace_generated_section("no markers here", "x")


def test_bad_records_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no walkthrough records"):
        render_walkthrough_figures([], tmp_path)
    with pytest.raises(ValueError, match="expected 1 \\+ 2\\(N-1\\)"):
        walkthrough_markdown_tables([r[:2] for r in _fake_records(2)])
