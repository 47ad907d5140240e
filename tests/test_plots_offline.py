"""`dvc plots show` offline: the HTML template inlines Vega (no external URL), and, where the npm
builds and Chromium are installed (make test or make plots installs them; apt-get install chromium), the rendered page
draws every chart without a network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.core.params import ConfigError
from stages.core.report import VEGA_BUILDS, offline_html_template, write_plots

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = Path(os.environ.get("VEGA_NODE_MODULES", ROOT / ".cache" / "vega" / "node_modules"))
# What would make a browser fetch something: script/link/img sources, CSS imports and url(), ES imports.
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import\s+["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|"""
                      r"""\bimport\s*(?:\(|[^;]*?\bfrom)\s*["'](?:https?:)?//""", re.IGNORECASE)


def _fake_builds(root: Path) -> Path:
    for rel in VEGA_BUILDS:
        package = rel.split("/")[0]
        (root / package / "build").mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"window.{package.replace('-', '_')} = 1; var s = '</script>';\n"
                                f"//# sourceMappingURL={package}.min.js.map\n")
        (root / package / "package.json").write_text(json.dumps({"name": package, "version": "0.0.1"}))
    return root


def test_template_inlines_the_builds_and_references_no_external_url(tmp_path):
    page = offline_html_template(_fake_builds(tmp_path / "node_modules"))
    assert "{plot_divs}" in page and "{scripts}" not in page        # DVC's CDN script tags are never inserted
    assert page.count("<script>") == 3 and "vega@0.0.1, vega-lite@0.0.1, vega-embed@0.0.1" in page
    assert "<\\/script>" in page and "sourceMappingURL" not in page
    assert not EXTERNAL.search(page)
    assert EXTERNAL.search('<script src="https://cdn.example/vega@5"></script>')   # the check can fail


def test_missing_builds_are_a_config_error_that_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="npm install --prefix .cache/vega vega@6.4.0 vega-lite@6.5.0 vega-embed@7.3.0"):
        offline_html_template(tmp_path)


def test_dvc_html_with_the_template_has_no_external_url(tmp_path):
    """DVC fills the template: the page it writes loads nothing from a network."""
    repo = _plots_repo(tmp_path, _fake_builds(tmp_path / "node_modules"))
    html = (repo / "out" / "index.html").read_text()
    assert html.count("vegaEmbed(") == 4 and not EXTERNAL.search(html)


def _plots_repo(tmp_path: Path, node_modules: Path) -> Path:
    """A scratch repository with this project's top-level plots, templates and a run's plot files."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [p for p in plots if isinstance(p, dict)]}))
    metrics = {"n_test": 3, "base": {"rouge_l": 0.1, "fact_recall": 0.0}, "tuned": {"rouge_l": 0.4, "fact_recall": 0.5},
               "by_category": {"leave": {"n": 1, "base": {"rouge_l": 0.1, "fact_recall": 0.0},
                                         "tuned": {"rouge_l": 0.4, "fact_recall": 0.5}}}}
    write_plots(metrics, repo / "reports" / "eval" / "plots")
    for split, values in (("train", (9.0, 6.0, 4.0)), ("val", (8.0, 6.5, 5.0))):
        folder = repo / "dvclive" / "train" / "plots" / "metrics" / split
        folder.mkdir(parents=True)
        (folder / "loss.tsv").write_text("step\tloss\n" + "".join(f"{10 * (i + 1)}\t{v}\n" for i, v in enumerate(values)))
    template = repo / "page.html"
    template.write_text(offline_html_template(node_modules))
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), "-o", "out"],
                   cwd=repo, check=True, capture_output=True, timeout=120)
    return repo


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="Chromium not installed (apt-get install chromium)")
@pytest.mark.skipif(not (NODE_MODULES / VEGA_BUILDS[0]).is_file(),
                    reason="Vega builds not installed (make test or make plots installs them under .cache/vega)")
def test_chromium_draws_every_chart_offline(tmp_path):
    repo = _plots_repo(tmp_path, NODE_MODULES)
    page = repo / "out" / "index.html"
    done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = done.stdout
    # vega-embed replaces each placeholder with a rendered chart (SVG or canvas) and reports no error
    drawn = dom.count('class="marks"') + dom.count("<canvas")
    assert drawn >= 4, dom[:2000]
    for words in ("Training and validation loss", "Base vs tuned on the test split", "ROUGE-L per topic"):
        assert words in dom
    assert "Error" not in re.sub(r"<script>.*?</script>", "", dom, flags=re.S)
