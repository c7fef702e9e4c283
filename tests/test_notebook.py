"""examples/quickstart.ipynb runs top to bottom in a kernel of this interpreter: the SFT loss falls,
the loss curve is drawn, the trained model answers every prompt and the verifier scores them.
The notebook is committed without outputs."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def kernel_for_this_python(tmp_path) -> KernelManager:
    """A kernel manager that starts `sys.executable -m ipykernel_launcher`, whatever kernels are
    (or are not) installed globally: the kernel spec lives in tmp_path. The kernel inherits this
    process's environment (the offline switches and $ALIGNLOOP_CACHE of conftest)."""
    kernels = tmp_path / "kernels"
    (kernels / "alignloop-test").mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "alignloop test", "language": "python"}
    (kernels / "alignloop-test" / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name="alignloop-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def with_parameters(nb, **values):
    """A cell after the one tagged `parameters` that sets `values` (as papermill does)."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, id="injected-parameters"))
    return nb


def text_of(cell) -> str:
    return "".join(out["text"] for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(tmp_path):
    examples = NOTEBOOK.parent
    before = sorted(p.name for p in examples.iterdir())
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), run_dir=str(tmp_path / "run"))
    client = NotebookClient(nb, km=kernel_for_this_python(tmp_path), timeout=240,
                            resources={"metadata": {"path": str(examples)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    output = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    first, last = map(float, re.search(r"loss: ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < 0.8 * first, output
    found = re.search(r"answers: (\d+), verified correct: (\d+)/(\d+) \(reference answers: (\d+)/",
                      output)
    answers, correct, total, reference = map(int, found.groups())
    assert answers == total == 8 and 0 <= correct <= total
    assert reference == 8  # the verifier accepts every worked reference answer
    generated = re.findall(r"^  model: +(.*)  verifier: (0\.0|1\.0)$", output, re.M)
    assert len(generated) == 8 and all(text not in ("''", '""') for text, _ in generated), output
    assert re.search(r"\d+ of \d+ tokens carry the loss", output)
    assert "[<|eot_id|>]" in output and "[<|start_header_id|>]" not in output  # answer + eot only
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) == 1
    assert (tmp_path / "run" / "round_0" / "sft" / "metrics.json").is_file()
    assert sorted(p.name for p in examples.iterdir()) == before  # nothing written beside it
