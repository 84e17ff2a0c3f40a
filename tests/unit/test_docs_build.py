"""The documentation site builds with --strict (no broken link, no page left out of the nav), and its
configuration reference, generated from the schema at build time, lists every key of the schema."""

from __future__ import annotations

from pathlib import Path

from mkdocs.commands.build import build
from mkdocs.config import load_config

from lora_launch.studio.form import schema_fields

ROOT = Path(__file__).resolve().parents[2]


def test_docs_build_strict_with_every_schema_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    site = tmp_path / "site"
    build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=True))  # strict: a warning aborts
    reference = (site / "reference" / "index.html").read_text()
    missing = [f["key"] for f in schema_fields() if f"<code>{f['key']}</code>" not in reference]
    assert not missing, f"keys missing from the generated reference: {missing}"
    assert (site / "studio" / "index.html").is_file()
