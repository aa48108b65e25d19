"""The ```python examples of docs/usage.md's "## Python" section, each run as written: documented code cannot rot.

Each block runs on its own in a fresh temporary folder, with the shipped weights, offline and with
``TEXTSEGMENT_HOME`` in that folder. The folder lies where the repository would, with the real data
beside it as ``../shared/data``, so the DICOM example's path is the one a user of a checkout types.
The first example reads ``ct.nii.gz``: a small phantom is saved under that name first.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USAGE = REPO / "docs" / "usage.md"


def python_blocks() -> list[str]:
    """The ```python blocks between "## Python" and the next "## " heading."""
    text = USAGE.read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


BLOCKS = python_blocks()


def test_the_python_section_has_its_examples():
    assert len(BLOCKS) >= 6  # segment, files, saliency, phantom + Dice, SemantiBench, DICOM study


@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=lambda n: f"block{n + 1}")
def test_example_runs(number, shared_data, tmp_path, monkeypatch):
    from TextSegmentLib.phantom import make_phantom, save_phantom

    work = tmp_path / "main"
    work.mkdir()
    os.symlink(shared_data.parent, tmp_path / "shared")  # ../shared/data as beside the repository
    save_phantom(make_phantom(seed=1, shape=(16, 64, 64)), work)  # ct.nii.gz for the example that reads a file
    for name, value in {"TEXTSEGMENT_HOME": tmp_path / "home", "TEXTSEGMENT_OFFLINE": "1",
                        "MPLCONFIGDIR": tmp_path / "mpl"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(work)
    script = tmp_path / f"example_{number + 1}.py"
    script.write_text(BLOCKS[number])
    runpy.run_path(str(script), run_name="__main__")
