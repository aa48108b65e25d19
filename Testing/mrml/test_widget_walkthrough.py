"""A Slicer user's walk through the module's GUI, on test_ui_file's stand-ins for Qt and Slicer, and
the logic moved out of the widget on real MRML (slicer-core).

Each test is one path a user takes (Cancel, Ctrl+Enter during a run, closing the scene during a
download, a broken dependency check, DICOM SEG export) and the state the GUI must end in.
"""

from __future__ import annotations

import threading
import types

import pytest
import test_ui_file
from test_ui_file import _Node

from TextSegmentLib.errors import Cancelled
from TextSegmentLib.slicer_jobs import CANCELLED, EitherToken, Job

widget = test_ui_file.widget  # the fixture: TextSegment.py's widget set up on stand-ins for Qt and Slicer


def _job(title: str = "Segmenting CT") -> Job:
    return Job(id=1, title=title, compute=lambda report, token: None, cancel_token=EitherToken())


def _poll(widget, job: Job, kind: str, payload=None) -> None:
    """The worker's news reaching the widget's poll timer."""
    widget.logic._events.put((job, kind, payload))
    widget.onPoll()


def _apply(widget, monkeypatch, job: Job) -> list[dict]:
    calls = []
    monkeypatch.setattr(widget.module.SegmentationLogic, "segment", lambda self, **kw: calls.append(kw) or job)
    p = widget._parameterNode
    p.inputVolume, p.prompts = _Node("CT"), "liver\nleft kidney"
    widget.onApplyButton()
    assert calls and widget._job is job, widget.errors
    return calls


# Apply -> Cancel -> Apply ------------------------------------------------------------------------
def test_cancel_is_pressed_once_and_stays_in_view_until_the_run_stops(widget, monkeypatch):
    ui, job = widget.ui, _job()
    _apply(widget, monkeypatch, job)
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancel", True)
    widget.onApplyButton()  # Cancel
    assert job.cancel_token.cancelled
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Cancelling…", False)
    _poll(widget, job, "progress", (0.4, "slice 4/10"))  # queued before the click
    assert ui.statusLabel.text == "Cancelling after the current slice…", "progress hid the cancel request"
    assert ui.progressBar.value == 40
    _poll(widget, job, CANCELLED)
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert ui.statusLabel.text == "Cancelled; nothing was changed."
    again = _job()
    _apply(widget, monkeypatch, again)  # Apply again starts a new run
    assert ui.applyButton.text == "Cancel" and not again.cancel_token.cancelled


def test_ctrl_enter_during_a_run_does_not_cancel_it(widget, monkeypatch):
    job = _job()
    calls = _apply(widget, monkeypatch, job)
    (shortcut, *_) = widget._shortcuts
    shortcut.emit("activated()")  # the user typed the next prompt and pressed Ctrl+Enter
    assert not job.cancel_token.cancelled and widget.ui.applyButton.text == "Cancel"
    assert len(calls) == 1
    _poll(widget, job, CANCELLED)
    shortcut.emit("activated()")  # with no run going, Ctrl+Enter runs
    assert len(calls) == 2


# scene close -------------------------------------------------------------------------------------
def test_closing_the_scene_cancels_a_run_but_not_a_download(widget, monkeypatch):
    run = _job()
    _apply(widget, monkeypatch, run)
    widget.onSceneStartClose(None, None)
    assert run.cancel_token.cancelled  # its input goes with the scene
    _poll(widget, run, CANCELLED)
    widget.onSceneEndClose(None, None)

    download = _job("Downloading fmc-v8")
    widget._start(download, "weights")
    widget.onSceneStartClose(None, None)
    assert not download.cancel_token.cancelled, "closing the scene cancelled a weights download"
    widget.onSceneEndClose(None, None)


def _download_listing(widget, monkeypatch) -> tuple[Job, list]:
    """A weights download started, and the models whose weights list the widget reads from then on."""
    listed = []
    choices = widget.module.SegmentationLogic.weights_choices
    monkeypatch.setattr(widget.module.SegmentationLogic, "weights_choices",
                        lambda self, model: listed.append(model) or choices(self, model))
    download = _job("Downloading fmc-v8")
    widget._start(download, "weights")
    return download, listed


def test_weights_downloaded_while_the_module_was_hidden_are_listed_when_it_shows(widget, monkeypatch):
    download, listed = _download_listing(widget, monkeypatch)
    widget.parent.isEntered = False
    widget.exit()
    widget.onSceneStartClose(None, None)  # another scene loaded meanwhile, the module not shown
    widget.onSceneEndClose(None, None)
    _poll(widget, download, "computed", "/cache/fmc-v8.safetensors")
    assert listed == []
    widget.parent.isEntered = True
    widget.enter()
    assert listed == [widget._parameterNode.model], "the weights list was not read again after the download"


# dependencies ------------------------------------------------------------------------------------
def test_a_broken_dependency_check_does_not_stop_apply_with_a_traceback(widget, monkeypatch):
    def broken():
        raise FileNotFoundError("Resources/requirements.txt")

    monkeypatch.setattr(widget.module, "missingDependencies", broken)
    calls = _apply(widget, monkeypatch, _job())  # raised out of the slot before the fix
    assert len(calls) == 1 and widget.errors == []


# DICOM SEG export --------------------------------------------------------------------------------
def test_dicom_seg_export_runs_as_a_job_and_gives_the_buttons_back(widget, monkeypatch):
    ui, export = widget.ui, _job("Exporting DICOM SEG to seg.dcm")
    asked = []
    monkeypatch.setattr(widget.module.SegmentationLogic, "export_dicom_seg",
                        lambda self, outcome, *, path, overwrite, wait=True: asked.append((path, overwrite, wait)) or export)
    monkeypatch.setattr(widget.module.qt, "QFileDialog",
                        types.SimpleNamespace(getSaveFileName=lambda *args: "/out/seg.dcm"), raising=False)
    widget._outcome = types.SimpleNamespace(input_node=_Node("CT"), saliency_nodes={})
    ui.exportDicomSegButton.enabled = True
    widget.onExportDicomSeg()
    assert asked == [("/out/seg.dcm", True, False)], "the export ran on the main thread"
    assert widget._job is export and not ui.exportDicomSegButton.enabled and ui.applyButton.text == "Cancel"
    _poll(widget, export, "computed", "/out/seg.dcm")
    assert ui.statusLabel.text == "DICOM SEG written to /out/seg.dcm"
    assert ui.exportDicomSegButton.enabled and ui.applyButton.text == "Apply"


def test_a_run_disables_export_until_it_ends(widget, monkeypatch):
    ui = widget.ui
    widget._outcome = types.SimpleNamespace(input_node=_Node("earlier CT"), saliency_nodes={})
    ui.exportDicomSegButton.enabled = True
    run = _job()
    _apply(widget, monkeypatch, run)
    assert not ui.exportDicomSegButton.enabled  # a second job would hide the end of the first
    _poll(widget, run, CANCELLED)
    assert ui.exportDicomSegButton.enabled  # the last outcome can still be exported


@pytest.fixture
def export_case(context, shared_data):
    from test_dicom_seg_export import THREE_SLICES, BoneModel, _load

    from TextSegmentLib.slicer_logic import SegmentationLogic

    logic = SegmentationLogic(context=context)
    node, files, database = _load(context, shared_data, THREE_SLICES)
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    yield logic, outcome, database
    logic.shutdown()


def test_export_dicom_seg_reads_and_writes_on_the_worker(export_case, tmp_path, monkeypatch):
    import TextSegmentLib.dicom_seg as dicom_seg

    logic, outcome, database = export_case
    threads = []
    write = dicom_seg.write_dicom_seg
    monkeypatch.setattr(dicom_seg, "write_dicom_seg",
                        lambda *args, **kw: threads.append(threading.current_thread()) or write(*args, **kw))
    job = logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database, wait=False)
    assert isinstance(job, Job)
    assert logic.wait(job, timeout=120) == tmp_path / "seg.dcm"
    assert (tmp_path / "seg.dcm").stat().st_size > 0
    assert threads == [logic.worker.thread], "the SEG was written on the main thread"


def test_a_cancelled_export_writes_nothing(export_case, tmp_path):
    logic, outcome, database = export_case
    gate = threading.Event()
    logic.submit("busy", lambda report, token: gate.wait(30))  # the worker is busy: the export waits behind it
    job = logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database, wait=False)
    job.cancel()
    gate.set()
    with pytest.raises(Cancelled):
        logic.wait(job, timeout=120)
    assert not (tmp_path / "seg.dcm").exists()


# a run that fails --------------------------------------------------------------------------------
def test_a_failed_run_shows_its_error_once_and_gives_everything_back(widget, monkeypatch):
    from TextSegmentLib.errors import InputError

    ui, job = widget.ui, _job()
    _apply(widget, monkeypatch, job)
    _poll(widget, job, "progress", (0.37, "slice 37/100"))
    _poll(widget, job, "failed", InputError("the volume 'CT' was removed while it was being segmented"))
    assert len(widget.errors) == 1 and "was removed" in widget.errors[0]
    assert (ui.applyButton.text, ui.applyButton.enabled) == ("Apply", True)
    assert ui.installDependenciesButton.enabled and ui.importWeightsButton.enabled and ui.downloadWeightsButton.enabled
    assert ui.progressBar.value == 0, "the progress bar stayed where the run failed"


# model -------------------------------------------------------------------------------------------
def test_a_model_the_presets_lack_is_shown_and_can_be_changed(widget):
    ui, p = widget.ui, widget._parameterNode
    p.model = "freqmedclip-large"  # a scene saved by a newer version, or set from the console
    assert ui.modelComboBox.currentText == "freqmedclip-large", "the list showed another model than the one that runs"
    ui.modelComboBox.currentIndex = ui.modelComboBox.findData("freqmedclip-tiny")
    assert p.model == "freqmedclip-tiny", "choosing the model the list showed did not change the model"


# switching the input volume ----------------------------------------------------------------------
def test_an_output_made_for_another_volume_is_dropped_even_when_none_came_in_between(widget):
    p = widget._parameterNode
    output = _Node("CT A TextSegment")
    output.geometry = "CT A"
    p.inputVolume = _Node("CT A")
    p.outputSegmentation = output  # the last run's output, on A
    p.inputVolume = None  # A removed in the Data module: the selector shows None ...
    output.geometry = None  # ... and MRML drops the segmentation's reference to it
    p.inputVolume = _Node("CT B")
    assert p.outputSegmentation is None, "a run on B would replace the segments in A's segmentation"
    mine = _Node("CT B TextSegment")
    mine.geometry = "CT B"
    p.outputSegmentation = mine
    p.inputVolume = _Node("CT C")
    p.inputVolume = p.inputVolume  # no change: nothing dropped twice
    assert p.outputSegmentation is None
    p.outputSegmentation = mine  # chosen again by the user for C: kept
    p.prompts = "liver"
    assert p.outputSegmentation is mine


def test_output_fits_input_on_real_mrml(context):
    import numpy as np

    from TextSegmentLib.slicer_bridge import node_from_volume
    from TextSegmentLib.slicer_logic import output_fits_input
    from TextSegmentLib.volume import Volume

    def volume(name):
        return node_from_volume(Volume(np.zeros((4, 8, 8), np.int16), spacing=(1, 1, 1), origin=(0, 0, 0),
                                       direction=np.eye(3)), context=context, name=name)

    a, b = volume("A"), volume("B")
    output = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "A TextSegment")
    assert not output_fits_input(output, input_node=a)  # made for no volume yet
    output.SetReferenceImageGeometryParameterFromVolumeNode(a)
    assert output_fits_input(output, input_node=a) and not output_fits_input(output, input_node=b)
    context.scene.RemoveNode(a)
    assert not output_fits_input(output, input_node=b), "A removed: its segmentation is still not B's"


# importing weights -------------------------------------------------------------------------------
def test_imported_weights_are_the_ones_the_next_run_loads(widget, monkeypatch):
    ui, p = widget.ui, widget._parameterNode
    monkeypatch.setattr(widget.module.qt, "QFileDialog",
                        types.SimpleNamespace(getOpenFileName=lambda *args: "/data/my-fine-tune.safetensors"), raising=False)
    imports = [_job("Importing my-fine-tune.safetensors"), _job("Importing tgc.safetensors")]
    monkeypatch.setattr(widget.module.SegmentationLogic, "import_weights", lambda self, path, *, wait: imports.pop(0))
    assert p.weights == ""  # default weights
    widget.onImportWeights()
    job = widget._job
    _poll(widget, job, "computed", types.SimpleNamespace(id="my-fine-tune", model=p.model, kind="checkpoint"))
    assert p.weights == "my-fine-tune", "the next run would load the default weights, not the imported ones"
    assert ui.weightsComboBox.itemData(ui.weightsComboBox.currentIndex) == "my-fine-tune"
    widget.onImportWeights()  # weights for another model: the model is not changed behind the user's back
    job = widget._job
    _poll(widget, job, "computed", types.SimpleNamespace(id="tgc-ft", model="tgcnet-tiny", kind="checkpoint"))
    assert p.weights == "my-fine-tune" and p.model == "freqmedclip-tiny"
    assert "choose that model" in ui.statusLabel.text and "tgcnet-tiny" in ui.statusLabel.text


def test_a_finished_download_refreshes_the_weights_list_once(widget, monkeypatch):
    download, listed = _download_listing(widget, monkeypatch)
    _poll(widget, download, "computed", "/cache/fmc-v8.safetensors")
    assert listed == [widget._parameterNode.model]  # "remote" becomes "cached"
    assert widget.ui.statusLabel.text == "Downloading fmc-v8: done."


# a saved scene opened again ----------------------------------------------------------------------
def test_a_reopened_scene_shows_its_saliency_maps_at_the_layer_it_was_saved_at(widget, monkeypatch):
    """The saliency panel said "Run with Explain on" over a scene that held the maps: it knew only this session's
    runs, and the layer the scene's parameter node named (saliencyLayer) was never read back."""
    logic_class = widget.module.SegmentationLogic
    maps = {"liver": {"vit.3": _Node("m1"), "vit.11": _Node("m2"), "combined": _Node("m3")},
            "left kidney": {"vit.3": _Node("m4"), "vit.11": _Node("m5"), "combined": _Node("m6")}}
    in_scene = {}  # input id -> maps, as the scene holds them (filled once the scene is imported)

    def outcome_in_scene(self, node):
        found = in_scene.get(node.GetID())
        return widget.module.slicer_logic.SegmentOutcome(input_node=node, segmentation_node=None, run=None,
                                                         saliency_nodes=found) if found else None

    shown = []
    monkeypatch.setattr(logic_class, "outcome_in_scene", outcome_in_scene)
    monkeypatch.setattr(logic_class, "show_saliency", lambda self, outcome, **kw: shown.append((outcome.input_node.GetID(), kw)))
    ui, p = widget.ui, widget._parameterNode
    ui.combinedMapCheckBox.checked = False  # as the reopened scene's parameter node binds it
    p.saliencyLayer = "vit.11"
    p.inputVolume = _Node("CT")  # the scene's parameter node is read before its volumes are all in
    assert ui.saliencyPromptComboBox.items == [] and shown == []
    in_scene["CT"] = maps
    widget.onSceneEndImport(None, None)
    assert [text for text, _ in ui.saliencyPromptComboBox.items] == ["liver", "left kidney"]
    assert shown[-1] == ("CT", {"prompt": "liver", "layer": "vit.11", "opacity": ui.saliencyOpacitySlider.value})
    assert (ui.saliencyLayerSlider.value, ui.saliencyLayerSlider.maximum, ui.saliencyLayerLabel.text) == (1, 1, "vit.11")
    assert p.saliencyLayer == "vit.11" and widget.errors == []

    p.inputVolume = _Node("CT without maps")  # another volume with no maps leaves the panel as it was
    assert [text for text, _ in ui.saliencyPromptComboBox.items] == ["liver", "left kidney"]
    in_scene["CT 2"] = {"spleen": {"vit.3": _Node("m7")}}
    p.inputVolume = _Node("CT 2")  # one with maps of its own shows them
    assert [text for text, _ in ui.saliencyPromptComboBox.items] == ["spleen"] and shown[-1][0] == "CT 2"

    _, finish = test_ui_file._finished_run(widget, monkeypatch, input_id="CT 3")  # this session's run wins over the scene's maps
    in_scene["CT 3"] = {"liver": {"vit.3": _Node("old")}}
    finish()
    p.inputVolume = _Node("CT 2")
    p.inputVolume = _Node("CT 3")
    assert widget._shown is widget._outcome and ui.saliencyPromptComboBox.items == []  # the run had no maps
