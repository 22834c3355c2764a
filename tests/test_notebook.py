"""notebooks/lmu_asr_demo.ipynb: committed without outputs, and executed top to bottom in a fresh
kernel (nbclient) on a tiny configuration given as papermill-style parameters."""

from __future__ import annotations

import base64
import io
import json

import nbformat
import pytest
from matplotlib.image import imread
from nbclient import NotebookClient

from lmu_asr.config import ROOT

NOTEBOOK = ROOT / "notebooks" / "lmu_asr_demo.ipynb"
TINY = ["model=lmu_tiny", "data.corpus_train=24", "data.corpus_dev=4", "data.corpus_test=4"]
TINY += ["data.num_workers=0", "data.max_frames=3000", "trainer.threads=1", "trainer.log_every=5"]
TINY += ["trainer.max_minutes=0", "trainer.max_steps=20", "trainer.eval_every=10", "tracking=off"]
FIGURES = 9  # spectrograms, delay, paths, curves, attention (mean, heads), posteriogram, memory x2


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert NOTEBOOK.stat().st_size < 100_000


def outputs(nb, kind: str) -> list:
    """Every output of the executed notebook's code cells that has this MIME type's data."""
    return [o.data[kind] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if kind in o.get("data", {})]  # fmt: skip


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.timeout(300)
def test_notebook_runs_top_to_bottom_on_a_tiny_configuration(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    source = f"OVERRIDES = {overrides!r}\nRUN_DIR = '{run_dir}'\nDEMO_RUN = None\nN_EXAMPLES = 2"
    params = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, params)  # as papermill does: after the parameters cell

    # raises CellExecutionError, with the cell and its traceback, at the first failing cell
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # it trained the tiny run it was given (not a demo run found on this machine)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["steps"] == 20
    assert 0 <= results["test_cer"] <= 2 and "test_wer_lm" in results

    pngs = outputs(nb, "image/png")
    assert len(pngs) == FIGURES
    for png in pngs:  # drawn, not blank
        assert imread(io.BytesIO(base64.b64decode(png)))[..., :3].std() > 0.05
    audio = [h for h in outputs(nb, "text/html") if "<audio" in h]
    assert len(audio) == 2 + 1  # N_EXAMPLES training utterances, one dev utterance
    text = "".join("".join(o.get("text", "")) for c in code for o in c.outputs)
    assert "cuda" in text and "tracking  MLflow off" in text  # the doctor's checks
    assert "data      built-in corpus not built yet" in text  # the notebook builds it
    assert "test greedy" in text and "test lm" in text  # the evaluation table
    worst = [h for h in outputs(nb, "text/html") if "<table" in h]
    assert len(worst) == 1 and "reference" in worst[0] and "+ LM" in worst[0]
    assert text.count("REF:") == 4  # the word alignments of the (4) worst test utterances
