"""Every notebook runs top to bottom (executed with nbclient in a fresh kernel)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# what each notebook must print when it ran through (a number it measured, not a fixed string)
EXPECTED = {
    "01_sinks_massive_activations_smollm2": r"max \|recorder - reference\| = [0-9.e-]+(.|\n)*loss [0-9.]+ nats via "
                                            r"TransformerLens hooks, [0-9.]+ via HF hooks",
    "02_avsr_interventions": r"baseline WER [0-9.]+, CER [0-9.]+ on 4 utterances",
    "03_mome_sinks_across_rates": r"K_a=4: WER [0-9.]+ % on 4 utterances(.|\n)*K_a=32: WER [0-9.]+ % on 4",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_NB_UTTERANCES", "4")  # the AVSR notebook decodes 4 utterances per intervention
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(str(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
    assert path.stem in EXPECTED, f"add what {path.name} must print to EXPECTED"
    assert re.search(EXPECTED[path.stem], text), text[-2000:]
    assert "update is not the sum" not in text, "the recorder's split check fired on a notebook's model"


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
