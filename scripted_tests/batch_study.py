"""Segment every CT series of a DICOM study: one folder per series with NIfTI, DICOM SEG and a report.

Inside Slicer (the module's logic; --add-to-dicom-database also indexes the study and the SEGs)::

    Slicer --no-splash --no-main-window --python-script scripted_tests/batch_study.py \\
        STUDY_DIR OUT_DIR -p liver -p spleen [--model freqmedclip-base] [--device cuda] [--saliency]

Without Slicer the same batch runs headless (``textsegment batch`` does the same)::

    python scripted_tests/batch_study.py STUDY_DIR OUT_DIR -p liver

Exit code 0 when every CT series was segmented, 1 when some failed (the others still ran), 2 on an error.
"""

import argparse
import logging
import sys


def parse(argv):
    p = argparse.ArgumentParser(prog="batch_study.py", description=__doc__.splitlines()[0])
    p.add_argument("dicom_dir", help="folder (searched recursively) or DICOMDIR of the study")
    p.add_argument("output_dir", help="one sub-folder per series and batch_report.json go here")
    p.add_argument("--prompt", "-p", action="append", required=True, help="what to segment (repeat for several)")
    p.add_argument("--model", default="freqmedclip-tiny")
    p.add_argument("--weights", default=None, help="weights id or checkpoint path (default: the model's default)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--saliency", action="store_true", help="also write the layer-wise saliency maps")
    p.add_argument("--no-dicom-seg", action="store_true", help="write no DICOM SEG")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier batch")
    p.add_argument("--add-to-dicom-database", action="store_true", help="inside Slicer: index the study and the SEGs")
    return p.parse_args([a for a in argv if a != "--"])


def slicer_app():
    try:
        import slicer

        return slicer if getattr(slicer, "app", None) is not None else None
    except ImportError:
        return None


def main(argv):
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    slicer = slicer_app()
    if slicer is not None:
        logic = slicer.util.getModuleLogic("TextSegment")
    else:
        from TextSegmentLib.slicer_logic import SegmentationLogic

        logic = SegmentationLogic()  # no scene needed: the batch writes files only
    from TextSegmentLib.errors import TextSegmentError
    from TextSegmentLib.study_batch import exit_code

    def progress(fraction, message):
        logging.info("%3.0f%% %s", fraction * 100, message)

    try:
        report = logic.segment_dicom_study(
            dicom_dir=args.dicom_dir, prompts=args.prompt, output_dir=args.output_dir, dicom_seg=not args.no_dicom_seg,
            model=args.model, weights=args.weights, device=args.device, saliency=args.saliency,
            overwrite=args.overwrite, add_to_dicom_database=args.add_to_dicom_database, wait=True, progress=progress,
        )
    except TextSegmentError as exc:
        print(f"batch_study.py: error: {exc}", file=sys.stderr)
        return 2
    for series in report.series:
        print(f"{series.status:<9} {series.folder or series.description or series.key}" + (f": {series.error}" if series.error else ""))
    print(f"report: {report.report_path}")
    return exit_code(report)


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except ImportError as exc:
        print(f"batch_study.py: {exc}; install the dependencies first (TextSegment module, Setup section)", file=sys.stderr)
        code = 2
    except Exception:  # noqa: BLE001 - inside Slicer an uncaught error would leave the application running
        import traceback

        traceback.print_exc()
        code = 2
    app = slicer_app()
    if app is not None:
        app.util.exit(code)
    else:
        sys.exit(code)
