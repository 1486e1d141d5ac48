"""`make figures`: every figure the gallery names exists and is non-empty; a rerun rewrites nothing."""

from __future__ import annotations

import os

from interp.figures import SECTIONS, gallery_files, make_figures

FAST = ["weight_change", "intruders"]  # the weight-space sections: seconds on the zoo


def _stamps(folder):
    return {p.name: os.stat(p).st_mtime_ns for p in sorted(folder.iterdir()) if p.is_file()}


def test_gallery_names_only_files_that_exist(zoo_ready, tmp_path):
    gallery = make_figures(tmp_path, sections=FAST, progress=False)
    assert gallery, "no figures made"
    files = gallery_files(tmp_path)
    assert {f.suffix for f in files} == {".png", ".html"}
    for path in files:
        assert path.exists() and path.stat().st_size > 0, path
    assert len(files) == 2 * len(gallery)
    findings = (tmp_path / "findings.md").read_text()
    assert "## Weight change" in findings and "ntruder" in findings

    before = _stamps(tmp_path)
    make_figures(tmp_path, sections=FAST, progress=False)
    assert _stamps(tmp_path) == before, "a warm rerun rewrote files whose content did not change"


def test_every_analysis_has_a_section():
    assert [name for name, _ in SECTIONS] == ["weight_change", "intruders", "grafting", "patching",
                                              "context"]
