"""docs/api.md is what ``scripts/api_doc.py`` renders from the code now: a changed signature, docstring, config field
or ``--help`` fails here until the page is regenerated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_page_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_doc.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n(regenerate: .venv/bin/python scripts/api_doc.py)"


def test_api_page_names_the_public_verbs_and_the_entry_points():
    page = (ROOT / "docs" / "api.md").read_text()
    for name in ("dqrm.quant.api.quantize_", "dqrm.quant.api.QATConfig", "dqrm.quant.spec.QuantSpec",
                 "dqrm.quant.api.set_fake_quant", "dqrm.quant.embedding_qat.embedding_quantizer",
                 "dqrm.quant.export.export", "dqrm.quant.export.load_with_manifest", "python -m dqrm.pipeline.train",
                 "python -m dqrm.pipeline.predict"):
        assert f"### `{name}`" in page, name
