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

from TextSegmentLib.slicer_parameters import PARAMETERS
from TextSegmentLib.slicer_setup import TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT

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
    probe = ("import sys, TextSegmentLib.slicer_logic, TextSegmentLib.slicer_parameters, TextSegmentLib.slicer_setup, "
             "TextSegmentLib.slicer_bridge; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_requirements_are_the_pyproject_pins_without_torch():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from TextSegmentLib.slicer_setup import read_requirements

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


# the widget's own logic, on stand-ins for Qt and Slicer ------------------------------------------
# Only what TextSegment.py touches, with the Qt behaviour that matters here: a combo box emits
# currentIndexChanged when clear() empties it (-1) and when the first item is added (0), not when
# its index is set to the one it has, and not while its signals are blocked; parameterNodeWrapper's
# connectGui builds a QComboBoxToStringableConnector per call, which clears and refills the box.
class _Widget:
    def __init__(self, **values):
        self.text, self.enabled, self.toolTip, self.checked, self.value, self.maximum = "", True, "", False, 0, 0
        self.__dict__.update(values)
        self._slots, self._blocked = {}, False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args)

    def blockSignals(self, block):
        was, self._blocked = self._blocked, block
        return was

    def setContext(self, context):
        pass

    def start(self):
        pass

    def stop(self):
        pass

    def setInterval(self, ms):
        pass

    def setMRMLScene(self, scene):
        pass


class _Combo(_Widget):
    def __init__(self):
        super().__init__()
        self.items, self._index = [], -1

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self.items[self._index][0] if self._index >= 0 else ""

    def clear(self):
        self.items = []
        self.currentIndex = -1

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self._index < 0:
            self.currentIndex = 0

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1]

    def itemText(self, index):
        return self.items[index][0]

    @property
    def count(self):
        return len(self.items)

    def removeItem(self, index):  # as QComboBox: an item before the current one moves the current index
        del self.items[index]
        if index < self._index or self._index >= len(self.items):
            self.currentIndex = self._index - 1 if self.items else -1

    def setItemData(self, index, value, role):
        self.__dict__.setdefault("tooltips", {})[(index, role)] = value


class _Node:
    def __init__(self, node_id):
        self._id = node_id

    def GetID(self):
        return self._id

    def GetName(self):
        return self._id

    def GetReferenceImageGeometryReferenceRole(self):
        return "referenceImageGeometryRef"

    def GetNodeReferenceID(self, role):
        return getattr(self, "geometry", None)


class _ParameterNode:
    """A wrapped parameter node: attribute writes fire the Modified observers (once per NodeModify)."""

    def __init__(self, node, defaults, choices):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_choices", choices)
        for name, value in defaults.items():
            node.values.setdefault(name, value)

    def __getattr__(self, name):
        return self._node.values[name]

    def __setattr__(self, name, value):
        self._node.values[name] = value
        self._node.modified()

    def StartModify(self):
        self._node.depth += 1
        return self._node.depth > 1

    def EndModify(self, was):
        self._node.depth -= 1
        if self._node.depth == 0 and self._node.pending:
            self._node.modified()

    def connectGui(self, ui):
        for combo, name in ((ui.colormapComboBox, "colormap"), (ui.deviceComboBox, "device")):
            combo.clear()  # QComboBoxToStringableConnector.__init__
            for choice in self._choices[name]:
                combo.addItem(str(choice))
            combo.currentIndex = list(self._choices[name]).index(self._node.values[name])  # connector.write
            combo.connect("currentIndexChanged(int)",
                          lambda index, combo=combo, name=name: setattr(self, name, self._choices[name][index]))
        return 0

    def disconnectGui(self, tag):
        for combo in (self._node.ui.colormapComboBox, self._node.ui.deviceComboBox):
            combo._slots["currentIndexChanged(int)"] = [s for s in combo._slots.get("currentIndexChanged(int)", [])
                                                        if getattr(s, "__name__", "") != "<lambda>"]


class _RawNode:
    def __init__(self, ui):
        self.values, self.observers, self.depth, self.pending, self.ui = {}, [], 0, False, ui

    def modified(self):
        if self.depth:
            self.pending = True
            return
        self.pending = False
        for callback in list(self.observers):
            callback()


@pytest.fixture
def widget(monkeypatch):
    """TextSegment.py's widget, set up on stand-ins; ``widget.errors`` collects what errorDisplay showed."""
    import contextlib
    import importlib.util
    import types

    import TextSegmentLib.slicer_bridge  # noqa: F401 - on the real slicer and vtk, before the stand-ins

    ui = types.SimpleNamespace(**{name: _Combo() if element.get("class") == "QComboBox" else _Widget()
                                  for name, element in _ui_widgets().items()})
    raw = _RawNode(ui)
    errors, choices = [], {p.name: p.choices for p in PARAMETERS if p.choices}
    defaults = {p.name: p.default for p in PARAMETERS}

    @contextlib.contextmanager
    def node_modify(node):
        was = node.StartModify()
        try:
            yield
        finally:
            node.EndModify(was)

    class Mixin:
        def __init__(self, *args):
            pass

        def addObserver(self, obj, event, callback):
            if obj is raw or isinstance(obj, _ParameterNode):
                raw.observers.append(callback)

        def removeObserver(self, obj, event, callback):
            if callback in raw.observers:
                raw.observers.remove(callback)

        def removeObservers(self):
            raw.observers.clear()

    class ModuleWidget:
        def __init__(self, parent=None):
            self.parent = types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def setup(self):
            pass

        def resourcePath(self, name):
            return name

    class ModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return raw

    settings = {}
    qt = types.ModuleType("qt")
    qt.QTimer = lambda: _Widget()
    qt.QShortcut = lambda keys, parent: _Widget()
    qt.QKeySequence = lambda keys: keys
    qt.Qt = types.SimpleNamespace(WidgetWithChildrenShortcut=2, ToolTipRole=3)
    qt.QSettings = lambda: types.SimpleNamespace(value=settings.get, setValue=settings.__setitem__)
    slicer = types.ModuleType("slicer")
    slicer.vtkMRMLScalarVolumeNode = slicer.vtkMRMLSegmentationNode = object
    slicer.mrmlScene = types.SimpleNamespace(StartCloseEvent=1, EndCloseEvent=2, EndImportEvent=3,
                                             GetNodeByID=lambda node_id: None)
    slicer.app = types.SimpleNamespace(applicationLogic=lambda: types.SimpleNamespace(
        GetSelectionNode=lambda: types.SimpleNamespace(GetActiveVolumeID=lambda: None)))
    slicer.util = types.SimpleNamespace(
        loadUI=lambda path: _Widget(), childWidgetVariables=lambda widget: ui, VTKObservationMixin=Mixin,
        NodeModify=node_modify, errorDisplay=lambda text, **kw: errors.append(text), WaitCursor=contextlib.nullcontext)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    wrapper.parameterNodeWrapper = lambda cls: (lambda node: _ParameterNode(node, defaults, choices))
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleTest = object
    scripted.ScriptedLoadableModuleWidget, scripted.ScriptedLoadableModuleLogic = ModuleWidget, ModuleLogic
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = Mixin
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    for name, module in {"qt": qt, "slicer": slicer, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                         "slicer.ScriptedLoadableModule": scripted, "slicer.util": util, "vtk": vtk}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("TextSegment_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.slicer_setup, "probe_gpus", lambda: [])
    monkeypatch.setattr(module, "missingDependencies", lambda: [])
    weights = {"freqmedclip-tiny": [("", "default weights"), ("fmc-v8", "fmc-v8")],
               "tgcnet-tiny": [("", "default weights"), ("tgc-v9", "tgc-v9")]}
    monkeypatch.setattr(module.SegmentationLogic, "outcome_in_scene", lambda self, node: None)  # an empty scene
    monkeypatch.setattr(module.SegmentationLogic, "weights_choices", lambda self, model: weights.get(model, weights["tgcnet-tiny"][:1]))

    w = module.TextSegmentWidget()
    w.setup()
    w.enter()
    w.errors, w.module = errors, module
    yield w
    w.cleanup()


def test_choosing_another_model_drops_the_previous_models_weights(widget):
    ui, p = widget.ui, widget._parameterNode
    ui.weightsComboBox.currentIndex = ui.weightsComboBox.findData("fmc-v8")
    assert p.weights == "fmc-v8"
    ui.modelComboBox.currentIndex = ui.modelComboBox.findData("tgcnet-tiny")
    assert p.model == "tgcnet-tiny"
    # the list shows the default weights, and that is what the next run loads (not fmc-v8: a WeightsError)
    assert ui.weightsComboBox.itemData(ui.weightsComboBox.currentIndex) == p.weights == ""
    ui.weightsComboBox.currentIndex = ui.weightsComboBox.findData("tgc-v9")
    p.model = "tgcnet-tiny"  # the parameter node set again (console, scene): its weights stay
    assert p.weights == "tgc-v9"


def test_weights_not_in_the_list_are_shown_and_kept(widget):
    ui, p = widget.ui, widget._parameterNode
    combo = ui.weightsComboBox
    p.weights = "/data/checkpoints/my-fine-tune.safetensors"  # from the Python console or a loaded scene
    assert combo.currentText == "file: my-fine-tune.safetensors"  # not "default weights" while a run uses the file
    assert combo.itemData(combo.currentIndex) == p.weights == "/data/checkpoints/my-fine-tune.safetensors"
    assert combo.tooltips[(combo.currentIndex, 3)] == "/data/checkpoints/my-fine-tune.safetensors"
    p.prompts = "liver"  # any other change to the node: the value stays selected, no second item
    assert combo.itemData(combo.currentIndex) == p.weights and combo.count == 3
    p.weights = "/data/other.safetensors"  # another unlisted value replaces the first one's item
    assert [combo.itemData(i) for i in range(combo.count)] == ["", "fmc-v8", "/data/other.safetensors"]
    assert combo.currentText == "file: other.safetensors"
    combo.currentIndex = combo.findData("fmc-v8")  # choosing a listed item replaces the unlisted one
    assert p.weights == "fmc-v8"
    assert [combo.itemData(i) for i in range(combo.count)] == ["", "fmc-v8"]
    p.weights = "some-imported-id"
    assert combo.itemData(combo.currentIndex) == "some-imported-id" and "some-imported-id" in combo.currentText
    combo.currentIndex = 0
    assert p.weights == "" and combo.count == 2


def test_unlisted_weights_are_shown_when_the_widget_opens_and_dropped_with_the_model(widget):
    ui, p = widget.ui, widget._parameterNode
    widget.exit()
    p.weights = "/data/my.safetensors"  # a scene loaded while the module was not shown
    widget._weightsModel = None  # as a fresh widget: the list is read again
    widget.enter()
    assert ui.weightsComboBox.currentText == "file: my.safetensors"
    ui.modelComboBox.currentIndex = ui.modelComboBox.findData("tgcnet-tiny")  # existing behaviour: dropped
    assert p.model == "tgcnet-tiny" and p.weights == ""
    assert ui.weightsComboBox.currentText == "default weights" and ui.weightsComboBox.count == 2


def _known_weights(monkeypatch, widget, statuses):
    import types

    import TextSegmentLib.weights as weights_module

    monkeypatch.setattr(weights_module, "list_weights", lambda: statuses)
    shown, started = [], []
    widget.module.slicer.util.infoDisplay = lambda text, **kw: shown.append(text)
    widget.module.slicer.util.confirmOkCancelDisplay = lambda text, **kw: True
    monkeypatch.setattr(widget.module.SegmentationLogic, "download_weights",
                        lambda self, weights_id, *, model_name, wait: started.append((weights_id, model_name))
                        or types.SimpleNamespace(title=f"Downloading {weights_id}"))
    return shown, started


def _status(weights_id, model, *, default=False):
    import types

    entry = types.SimpleNamespace(id=weights_id, model=model, kind="checkpoint", size=2**20, licence="CC-BY-4.0")
    return types.SimpleNamespace(entry=entry, status="remote", default=default)


def test_downloading_the_default_weights_downloads_the_models_default(widget, monkeypatch):
    import types

    p = widget._parameterNode
    shown, started = _known_weights(monkeypatch, widget, [
        _status("tgc-v9", "tgcnet-tiny", default=True), _status("fmc-v7", p.model), _status("fmc-v8", p.model, default=True)])
    assert p.weights == ""  # "default weights" selected
    widget.onDownloadWeights()
    assert started == [("fmc-v8", p.model)], shown
    widget._finish(types.SimpleNamespace(state="cancelled", title="Downloading"))  # the buttons come back


def test_downloading_the_default_weights_says_why_when_the_model_has_none(widget, monkeypatch):
    p = widget._parameterNode
    shown, started = _known_weights(monkeypatch, widget, [_status("tgc-v9", "tgcnet-tiny", default=True)])
    widget.onDownloadWeights()
    assert started == [] and len(shown) == 1
    assert "No default weights are known for " + p.model in shown[0]
    p.weights = "/data/my.safetensors"
    widget.onDownloadWeights()
    assert started == [] and "nothing to download" in shown[1]


def test_a_broken_manifest_is_shown_not_hidden(widget, monkeypatch):
    def broken(self, model):
        raise ValueError("weights_manifest.json: entry 'x' lacks the required key 'sha256'")

    monkeypatch.setattr(widget.module.SegmentationLogic, "weights_choices", broken)
    widget.ui.modelComboBox.currentIndex = widget.ui.modelComboBox.findData("tgcnet-base")
    assert "lacks the required key" in widget.ui.weightsStatusLabel.text


def _finished_run(widget, monkeypatch, *, input_id="CT"):
    """Apply with the input ``input_id`` selected; returns the job and a finisher handing back an outcome with saliency."""
    import types

    from TextSegmentLib.engine import SegmentationRun

    p = widget._parameterNode
    p.inputVolume, p.prompts = _Node(input_id), "liver"
    calls = []
    monkeypatch.setattr(widget.module.SegmentationLogic, "segment", lambda self, **kw: calls.append(kw) or types.SimpleNamespace(title="Segmenting"))
    widget.onApplyButton()
    assert calls, widget.errors
    features = types.SimpleNamespace(prompts=[types.SimpleNamespace(prompt="liver", maps={})])
    outcome = widget.module.slicer_logic.SegmentOutcome(
        input_node=_Node(input_id), segmentation_node=_Node("Segmentation"),
        run=SegmentationRun(results=[], device="cpu", batch_size=1, seconds=1.0, slices=1, skipped_slices=0, features=features))
    job = types.SimpleNamespace(state="done", result=outcome, title="Segmenting")
    return calls[0], lambda: widget._finish(job)


def test_reentering_the_module_neither_fails_nor_recolours_the_saliency_maps(widget, monkeypatch):
    import TextSegmentLib.slicer_bridge as bridge

    recoloured = []

    def add_saliency_volumes(item, *, reference_node, context, colormap):
        if colormap not in widget.module.slicer_parameters.COLORMAPS:  # as saliency_color_node refuses ''
            raise bridge.InputError(f"colour table {colormap!r} is not in the scene")
        recoloured.append(colormap)
        return {}

    monkeypatch.setattr(bridge, "add_saliency_volumes", add_saliency_volumes)
    monkeypatch.setattr(widget.module.SegmentationLogic, "context", None)
    monkeypatch.setattr(widget.module.SegmentationLogic, "show_saliency", lambda self, *a, **kw: None)
    widget.ui.colormapComboBox.currentIndex = widget.ui.colormapComboBox.items.index(("Viridis", None))
    assert widget._parameterNode.colormap == "Viridis"
    kw, finish = _finished_run(widget, monkeypatch)
    assert kw["colormap"] == "Viridis"
    finish()
    assert recoloured == [] and widget.errors == []
    widget.exit()
    widget.enter()  # connectGui again: the colour map box is cleared and refilled
    assert recoloured == [] and widget.errors == [], "re-entering the module recoloured the maps or failed"
    widget.ui.colormapComboBox.currentIndex = widget.ui.colormapComboBox.items.index(("Magma", None))
    assert recoloured == ["Magma"] and widget.errors == []


def test_a_run_finishing_after_the_input_changed_does_not_become_the_new_inputs_output(widget, monkeypatch):
    _, finish = _finished_run(widget, monkeypatch, input_id="CT A")
    widget._parameterNode.inputVolume = _Node("CT B")  # picked while A was being segmented
    finish()
    assert widget._parameterNode.outputSegmentation is None  # B's next run gets a new segmentation
    _, finish = _finished_run(widget, monkeypatch, input_id="CT B")
    finish()
    assert widget._parameterNode.outputSegmentation.GetID() == "Segmentation"
