"""A self-contained HTML page of a demo or batch run: what was asked, what came out, and why.

Pictures are embedded (base64) so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from . import __version__

NOTICE = "Research use only. Not a medical device; not for diagnosis or treatment."


def write_html_report(report: Any, *, path: Path, overwrite: bool = False) -> Path:
    """Write ``report`` (a ``demo.DemoReport``) as one HTML file, atomically."""
    from .io.writers import atomic_write

    rows = []
    for case in report.cases:
        dice = "—" if case.dice is None else f"{case.dice:.3f}"
        rows.append(
            f"<tr><td>{html.escape(case.level)}</td><td>{html.escape(case.prompt)}</td>"
            f"<td>{case.voxels}</td><td>{dice}</td></tr>"
        )
    figures = []
    for case in report.cases:
        if case.montage is not None and Path(case.montage).is_file():
            data = base64.b64encode(Path(case.montage).read_bytes()).decode("ascii")
            figures.append(
                f"<figure><img alt='saliency montage' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(case.level)}: “{html.escape(case.prompt)}”</figcaption></figure>"
            )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TextSegment report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .3em .7em; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} .notice {{ color: #a00; font-weight: bold; }}
</style></head><body>
<h1>TextSegment report</h1>
<p class="notice">{NOTICE}</p>
<p>Model <b>{html.escape(report.model)}</b>, weights <b>{html.escape(report.weights)}</b>,
device {html.escape(report.device)}, {report.seconds:.1f} s (segmentation and saliency in one pass).</p>
<table><tr><th>level</th><th>prompt</th><th>voxels</th><th>Dice vs ground truth</th></tr>
{''.join(rows)}
</table>
<p>Files: <code>segmentation/</code> (label map, the same as a Slicer segmentation
<code>segmentation.seg.nrrd</code>, legend, probability maps),
<code>saliency/</code> (one map per layer and prompt, legend). Montages show the CT slice with the
predicted outline, one panel per layer and the combined map.</p>
{''.join(figures)}
<p><small>textsegment {__version__}</small></p>
</body></html>
"""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), overwrite=overwrite)
