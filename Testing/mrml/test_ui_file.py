"""The Slicer module's files, checked without Slicer.

* the .ui parses with PySide6's QUiLoader (offscreen; ctk/qMRML classes fall back to QWidget) and
  holds every widget ``TextSegment.py`` names as ``self.ui.<name>``;
* every ``SlicerParameterName`` binding is one ``parameterNodeWrapper.connectGui`` can make (the
  widget class its GUI connectors accept for the parameter's type), so a wrong binding fails here
  and not only in a user's Slicer;
* the module imports no torch at load (Slicer start-up; torch may not be installed yet);
* the packaging files agree with pyproject.toml and point at files that exist.
"""

from __future__ import annotations

import ast
import os
import re
import struct
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from TextSegmentLib.slicer_logic import PARAMETERS, TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "TextSegment" / "TextSegment.py"
UI = REPO / "TextSegment" / "Resources" / "UI" / "TextSegment.ui"
# parameters whose widgets are filled at run time, so the widget code writes them itself
WRITTEN_BY_THE_WIDGET = {"model", "weights", "saliencyLayer"}
# widget classes parameterNodeWrapper's GUI connectors accept, by parameter kind
CONNECTORS = {
    "node": {"qMRMLNodeComboBox"},
    bool: {"QCheckBox", "QPushButton"},
    int: {"QSpinBox", "QSlider"},
    float: {"QDoubleSpinBox", "ctkSliderWidget"},
    "choice": {"QComboBox"},
    str: {"QLineEdit", "QTextEdit"},
}


@pytest.fixture(scope="module")
def loaded_ui():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    handle = QFile(str(UI))
    assert handle.open(QFile.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(handle)
    handle.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


def _module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))


def _ui_names_used() -> set[str]:
    """Every ``self.ui.<name>`` in TextSegment.py."""
    names = set()
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _ui_widgets() -> dict[str, ET.Element]:
    widgets = {}
    for element in ET.parse(UI).getroot().iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"two widgets named {name!r} in the .ui"
        widgets[name] = element
    return widgets


def _property(element: ET.Element, name: str):
    for prop in element.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [s.text for s in value.findall("string")]
            return value.text
    return None


def test_ui_loads_offscreen_and_holds_every_widget_the_module_names(loaded_ui):
    from PySide6.QtCore import QObject

    used = _ui_names_used()
    assert {"promptsEdit", "applyButton", "progressBar", "modelComboBox", "saliencyLayerSlider"} <= used
    missing = sorted(name for name in used if loaded_ui.findChild(QObject, name) is None)
    assert missing == [], f"TextSegment.py names widgets the .ui lacks: {missing}"
    # the loaded widget carries the bindings as dynamic properties, as Slicer's loader does
    assert loaded_ui.findChild(QObject, "inputSelector").property("SlicerParameterName") == "inputVolume"


def test_every_parameter_binding_is_one_the_wrapper_can_make():
    by_name = {p.name: p for p in PARAMETERS}
    bound: dict[str, str] = {}
    for name, element in _ui_widgets().items():
        parameter = _property(element, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in by_name, f"{name} is bound to the unknown parameter {parameter!r}"
        assert parameter not in bound, f"{parameter!r} is bound twice ({bound.get(parameter)} and {name})"
        bound[parameter] = name
        p, cls = by_name[parameter], element.get("class")
        kind = "node" if p.is_node else "choice" if p.choices else p.type
        assert cls in CONNECTORS[kind], f"{name}: a {cls} cannot show {parameter!r} ({kind})"
        if p.is_node:
            assert _property(element, "nodeTypes") == [p.type], name
        if cls in ("ctkSliderWidget", "QSlider"):  # the wrapper refuses unbounded sliders
            assert p.bounds is not None, parameter
            assert (float(_property(element, "minimum")), float(_property(element, "maximum"))) == p.bounds, name
    assert set(bound) | WRITTEN_BY_THE_WIDGET == set(by_name)
    assert not set(bound) & WRITTEN_BY_THE_WIDGET

    written = {node.targets[0].attr for node in ast.walk(_module_tree())
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
               and isinstance(node.targets[0].value, ast.Attribute) and node.targets[0].value.attr == "_parameterNode"}
    assert WRITTEN_BY_THE_WIDGET <= written, "the widget must write the parameters no widget is bound to"


def test_the_module_defines_the_slicer_classes_and_imports_no_torch_at_load():
    tree = _module_tree()
    classes = {node.name: [b.id for b in node.bases if isinstance(b, ast.Name)]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["TextSegment"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["TextSegmentWidget"]
    assert set(classes["TextSegmentLogic"]) == {"SegmentationLogic", "ScriptedLoadableModuleLogic"}
    assert classes["TextSegmentTest"] == ["ScriptedLoadableModuleTest"]
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in top_level
    # what it imports from the Lib at load pulls in no torch either
    probe = "import sys, TextSegmentLib.slicer_logic, TextSegmentLib.slicer_bridge; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_requirements_are_the_pyproject_pins_without_torch():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from TextSegmentLib.slicer_logic import read_requirements

    requirements = read_requirements(REPO / "TextSegment" / "Resources" / "requirements.txt")
    assert {TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT} <= set(pyproject)
    assert sorted(requirements) == sorted(set(pyproject) - {TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT})
    assert all("<" in line for line in requirements), "every requirement needs a ceiling"


def _cmake_sets(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((EXTENSION_\w+)\s+"((?:[^"\\]|\\.)*)"', text)}


def test_extension_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    meta = _cmake_sets(text)
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert meta.get(f"EXTENSION_{key}", "").strip(), key
    assert meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert meta["EXTENSION_DEPENDS"] == "PyTorch"
    assert "Research use only" in meta["EXTENSION_DESCRIPTION"]
    assert meta["EXTENSION_ICONURL"].endswith("/Resources/Icons/TextSegment.png")
    assert text.index("add_subdirectory(TextSegmentLib)") < text.index("add_subdirectory(TextSegment)")
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


def test_module_and_lib_cmake_name_existing_files():
    module = (REPO / "TextSegment" / "CMakeLists.txt").read_text()
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", module, re.S).group(1).split()
    assert len(resources) == 3
    for entry in resources:
        assert (REPO / "TextSegment" / entry.replace("${MODULE_NAME}", "TextSegment")).is_file(), entry
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    lib = (REPO / "TextSegmentLib" / "CMakeLists.txt").read_text()
    assert "NAME TextSegmentLib" in lib and "WITH_SUBDIR" in lib and "data/*.json" in lib


@pytest.mark.parametrize("path", ["Resources/Icons/TextSegment.png", "TextSegment/Resources/Icons/TextSegment.png"])
def test_icons_are_128_pixel_pngs(path):
    data = (REPO / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_self_test_script_says_it_needs_slicer():
    done = subprocess.run([sys.executable, str(REPO / "scripted_tests" / "self_test.py")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "inside Slicer" in done.stderr
