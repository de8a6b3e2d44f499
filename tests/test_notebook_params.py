"""Notebook parameters as users type them with papermill: checked by name, type and range in the first
code cell of every section (writesae.notebook.check_parameters)."""
import subprocess
import sys
from pathlib import Path

import pytest

from writesae.notebook import ParameterError, check_parameters, defaults

NB = "04_closed_form"


def _ns(**given):
    ns = dict(defaults(NB))
    ns.update(given)
    return ns


@pytest.mark.parametrize("given,expect", [
    (dict(cell="[4, 3]"), dict(cell=[4, 3])),
    (dict(cell="L4H3"), dict(cell=[4, 3])),
    (dict(cell="4,3"), dict(cell=[4, 3])),
    (dict(cell=(4, 3)), dict(cell=[4, 3])),
    (dict(cells="L1H2,L4H3"), dict(cells=[[1, 2], [4, 3]])),
    (dict(cells="[[1, 2], [6, 0]]"), dict(cells=[[1, 2], [6, 0]])),
    (dict(n_atoms="4"), dict(n_atoms=4)),
    (dict(eps="[0.1, 1.0]"), dict(eps=[0.1, 1.0])),
    (dict(n_feat=64.0), dict(n_feat=64)),
    (dict(max_firings=10), dict()),  # another section's parameter (a shared params file): passes
])
def test_accepted_forms(given, expect):
    ns = _ns(**given)
    check_parameters(ns, NB)
    for k, v in expect.items():
        assert ns[k] == v


@pytest.mark.parametrize("given,words", [
    (dict(n_atom=4), "unknown parameter n_atom for 04_closed_form; valid names: model, device"),
    (dict(n_atoms="four"), "parameter n_atoms: expected an integer (default"),
    (dict(n_atoms=2.5), "parameter n_atoms: expected an integer"),
    (dict(cell="L4-H3"), "parameter cell: expected a head as [layer, head], 'L4H3' or '4,3'"),
    (dict(cell=[4]), "parameter cell: expected a head"),
    (dict(cells=[]), "parameter cells: expected a non-empty list of heads"),
    (dict(eps="0.1, x"), "parameter eps: expected a list like"),
    (dict(k=100, n_feat=64), "k = 100 exceeds n_feat = 64"),
    (dict(epochs=0), "parameter epochs: must be at least 1, got 0"),
    (dict(model=3), "parameter model: expected str like the default 'embedded'"),
])
def test_rejected_with_one_line_naming_the_fix(given, words):
    with pytest.raises(ParameterError) as e:
        check_parameters(_ns(**given), NB)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_substitution_pool_is_checked_by_name():
    ns = dict(defaults("03_substitution"), pool="register")
    with pytest.raises(ParameterError, match=r"^parameter pool: expected one of 'top1', 'registers', got 'register'$"):
        check_parameters(ns, "03_substitution")
    ns = dict(defaults("03_substitution"), pool="top1")
    check_parameters(ns, "03_substitution")
    assert ns["pool"] == "top1"


def test_every_section_checks_its_parameters_first():
    import json

    root = Path(__file__).resolve().parent.parent / "notebooks"
    for p in sorted(root.glob("[0-9]*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        i = next(j for j, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
        first = next(c for c in cells[i + 1:] if c["cell_type"] == "code")
        assert f'check_parameters(globals(), "{p.stem}")' in "".join(first["source"][:2]), p.name


def test_papermill_typo_fails_at_once(tmp_path):
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "papermill", str(root / "notebooks" / f"{NB}.ipynb"),
                        str(tmp_path / "out.ipynb"), "-f", str(root / "params" / "tiny.yaml"), "-p", "n_atom", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "unknown parameter n_atom for 04_closed_form; valid names:" in r.stdout + r.stderr
    # the kernel's part of the report is the check's one line: it ends the output, no traceback above it
    tail = (r.stdout + r.stderr).strip().split('Exception encountered at "In [')[-1].splitlines()
    assert len(tail) == 2 and tail[1].startswith("ParameterError: unknown parameter n_atom"), tail


def test_a_headline_cell_outside_cells_is_extracted_with_them():
    """`papermill ... -p cell L2H1` with the default `cells`: its states go into the same dataset (no error
    telling the user to extract it by hand), and the dataset of a headline cell already listed is unchanged."""
    from writesae import pipeline
    from writesae.experiments.section import Section

    host = pipeline.host("tiny", "cpu")
    outside = Section(host, (2, 1), [(1, 1)], window=16, n_windows=2)
    inside = Section(host, (1, 1), [(1, 1)], window=16, n_windows=2)
    assert outside.data["cells"] == [[1, 1], [2, 1]] and outside.cells == [(1, 1)]
    assert inside.data == pipeline.data_spec(host, [(1, 1)], window=16, n_windows=2)
