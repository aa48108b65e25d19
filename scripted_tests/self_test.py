"""Run TextSegment's self-test in your Slicer (it checks the whole installation, a real model included).

    Slicer --no-splash --no-main-window --python-script scripted_tests/self_test.py

Exit code 0 when it passes. It needs the TextSegment extension (or --additional-module-paths
pointing at this repository's TextSegment/ folder) and the dependencies (the module's Setup
section). Outside Slicer, run the headless tests instead: ``make test``.
"""

import sys
import traceback

try:
    import slicer

    app = slicer.app
except (ImportError, AttributeError):
    app = None

if app is None:
    sys.exit("self_test.py runs inside Slicer only: Slicer --no-main-window --python-script scripted_tests/self_test.py")

try:
    import TextSegment

    TextSegment.TextSegmentTest().runTest()
except Exception:  # noqa: BLE001 - any failure is a failed self-test, shown with its traceback
    traceback.print_exc()
    print("TextSegment self-test FAILED")
    slicer.util.exit(1)
else:
    print("TextSegment self-test passed")
    slicer.util.exit(0)
