"""The README's API example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Cell(layer=0, head=0, d_k=32, d_v=32)" in out
    replace_diff, delete_diff = (float(x) for x in re.findall(r"tensor\(([-0-9.e]+)", out)[:2])
    assert replace_diff < 1e-4 < delete_diff  # replacing a write by itself is a no-op, deleting it is not


def test_command_line_help_does_not_load_torch():
    """``writesae --help`` starts in well under a second because nothing imports torch before a command runs."""
    import subprocess
    import sys

    code = "import sys, writesae, writesae.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    helped = subprocess.run([sys.executable, "-m", "writesae.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "train-sae" in helped.stdout
