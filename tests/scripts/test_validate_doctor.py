"""scripts/validate_doctor.py: Wilson intervals, seeds, the doc markers, and (slow) a --quick run on the tiny preset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("validate_doctor", REPO / "scripts" / "validate_doctor.py")
V = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(V)


def test_wilson_interval():
    lo, hi = V.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the textbook value
    lo, hi = V.wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = V.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)


def test_seeds_and_markers(tmp_path):
    assert V.parse_seeds("100-102,105") == [100, 101, 102, 105]
    with pytest.raises(SystemExit, match="used to tune"):
        V.main(["--seeds", "3-4", "--out", str(tmp_path), "--doc", ""])
    with pytest.raises(SystemExit, match="--mechanisms"):
        V.main(["--mechanisms", "warp", "--out", str(tmp_path), "--doc", ""])
    doc = tmp_path / "a.md"
    doc.write_text(f"x\n{V.BEGIN}\nold\n{V.END}\ny\n")
    V.write_between(doc, V.BEGIN, V.END, "new")
    assert doc.read_text() == f"x\n{V.BEGIN}\nnew\n{V.END}\ny\n"
    with pytest.raises(ValueError, match="markers"):
        V.write_between(doc, V.SAMPLE_BEGIN, V.SAMPLE_END, "z")


def test_docs_sample_log_claims_are_current():
    """docs/analyses.md's sample-log claims are what the script writes today."""
    text = (REPO / "docs" / "analyses.md").read_text()
    body = text.split(V.SAMPLE_BEGIN, 1)[1].split(V.SAMPLE_END, 1)[0].strip()
    assert body == V.sample_log_claims().strip()


@pytest.mark.slow
def test_quick_mode_trains_judges_and_writes_the_doc(tmp_path):
    doc = tmp_path / "analyses.md"
    doc.write_text(f"a\n{V.BEGIN}\n{V.END}\nb\n{V.SAMPLE_BEGIN}\n{V.SAMPLE_END}\n")
    out = tmp_path / "val"
    assert V.main(["--quick", "--out", str(out), "--doc", str(doc), "--guard", "1", "--mechanisms", "lr,pg_is"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["runs"]
    assert [g["run"] for g in res["guard"]] == ["lr-s200-guard", "pg_is-s200-guard"]
    for g in res["guard"]:  # a guarded re-train ends halted (exit 3) or finished, and says which
        assert g["status"] in ("finished", "halted") and (g["halted_at"] is None) == (g["status"] == "finished")
    assert sorted(r["mechanism"] for r in rows) == ["healthy", "healthy", "lr", "pg_is"]
    assert all(r["settings_version"] for r in rows)
    text = doc.read_text()
    assert "| mechanism | runs |" in text and "`unstable-long`: sustained collapse" in text
    stamp = {p: p.stat().st_mtime for p in out.glob("*/meta.json")}
    assert V.main(["--quick", "--out", str(out), "--doc", "", "--guard", "1", "--mechanisms", "lr,pg_is"]) == 0  # resumable
    assert stamp == {p: p.stat().st_mtime for p in out.glob("*/meta.json")}
    # --from-runs: finished runs another script trained, judged as pg_is (rule pg_is) or healthy (any other rule)
    import shutil

    roots = tmp_path / "calib"
    roots.mkdir()
    for r in rows:
        src = out / r["run"]
        rule = json.loads((src / "meta.json").read_text())["rule"]
        if r["mechanism"] in ("pg_is", "healthy"):
            shutil.copytree(src, roots / f"{rule}-s{r['seed']}", dirs_exist_ok=True)
    v2 = tmp_path / "v2"
    assert V.main(["--no-train", "--mechanisms", "", "--from-runs", str(roots), "--out", str(v2), "--doc", ""]) == 0
    judged = json.loads((v2 / "results.json").read_text())["runs"]
    assert sorted(r["mechanism"] for r in judged) == sorted(r["mechanism"] for r in rows
                                                           if r["mechanism"] in ("pg_is", "healthy"))
    shutil.copytree(roots / next(p.name for p in roots.iterdir()), roots / "dppo-s3")  # a tuning seed
    with pytest.raises(SystemExit, match="seed 3"):
        V.main(["--no-train", "--mechanisms", "", "--from-runs", str(roots), "--out", str(v2), "--doc", ""])
