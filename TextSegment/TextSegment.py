"""TextSegment: text-prompted CT segmentation with layer-wise saliency, as a 3D Slicer module.

A thin adapter. Everything that runs without Qt lives in TextSegmentLib and is tested headless:
``slicer_logic`` (segmentation, study batch), ``slicer_parameters`` (the parameter node),
``slicer_jobs`` (the worker thread), ``slicer_setup`` (GPUs, requirements), ``slicer_bridge`` (every
MRML change), the engine and the models. Nothing here imports torch at load time, so Slicer starts fast
and the module opens even before its dependencies are installed (Setup section).

Console::

    logic = slicer.util.getModuleLogic("TextSegment")
    outcome = logic.segment(volume=getNode("CT"), prompts=["liver", "spleen"], saliency=True, wait=True)
    logic.export_dicom_seg(outcome, path="ct_seg.dcm")   # a CT loaded with the DICOM module
    report = logic.segment_dicom_study(dicom_dir="study/", prompts=["liver"], output_dir="out/")
"""

import dataclasses
import logging
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from TextSegmentLib import slicer_logic, slicer_parameters, slicer_setup
from TextSegmentLib.errors import TextSegmentError
from TextSegmentLib.slicer_logic import SegmentationLogic
from TextSegmentLib.slicer_parameters import PARAMETERS

HISTORY_KEY = "TextSegment/PromptHistory"
HISTORY_LENGTH = 30
COMBINED = "combined"


class TextSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TextSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TextSegment contributors"]
        self.parent.helpText = _(
            "Type what to segment, one prompt per line (\"spleen\", \"left kidney excluding the cyst\"); "
            "FreqMedCLIP or TGC-Net segments the selected CT slice by slice and, on request, shows layer by "
            "layer what the model looked at. Research use only: not a medical device, not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "FreqMedCLIP and TGC-Net re-implemented in TextSegment; BiomedCLIP (MIT, research use only) "
            "by Microsoft; highdicom for DICOM SEG."
        )


# parameters: the same list slicer_parameters reads and writes headless -----------------------------
def _parameterNodeClass():
    """A parameterNodeWrapper class built from ``slicer_parameters.PARAMETERS`` (one source for both)."""
    annotations, defaults = {}, {}
    for p in PARAMETERS:
        if p.is_node:
            annotations[p.name] = getattr(slicer, p.type)
            continue
        kind = p.type
        if p.choices:
            kind = Annotated[kind, Choice(list(p.choices))]
        elif p.bounds:
            kind = Annotated[kind, WithinRange(*p.bounds)]
        annotations[p.name] = kind
        defaults[p.name] = p.default
    return parameterNodeWrapper(type("TextSegmentParameterNode", (), {"__annotations__": annotations, **defaults}))


TextSegmentParameterNode = _parameterNodeClass()


class TextSegmentLogic(SegmentationLogic, ScriptedLoadableModuleLogic):
    """``SegmentationLogic`` on the application's scene (see TextSegmentLib/slicer_logic.py)."""

    def __init__(self):
        SegmentationLogic.__init__(self)
        ScriptedLoadableModuleLogic.__init__(self)
        self.dicom_indexer = _indexDicomFolders

    def getParameterNode(self):
        return TextSegmentParameterNode(super().getParameterNode())


def _indexDicomFolders(folders):
    """Add folders (the study, the written SEGs) to Slicer's DICOM database; main thread only."""
    from DICOMLib import DICOMUtils

    for folder in folders:
        DICOMUtils.importDicom(str(folder))


# dependencies (main thread, with consent) --------------------------------------------------------
def missingDependencies():
    """Requirements not satisfied now, torch first; no pip, no network."""
    requirementsPath = _resourcePath("requirements.txt")
    return slicer_setup.missing_requirements(
        [slicer_setup.TORCH_REQUIREMENT, slicer_setup.TORCHVISION_REQUIREMENT]
        + slicer_setup.read_requirements(requirementsPath))


def installDependencies():
    """torch through the PyTorch extension (a CUDA build matched to the GPU), the rest with pip."""
    import PyTorchUtils

    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torchMissing = slicer_setup.missing_requirements([slicer_setup.TORCH_REQUIREMENT, slicer_setup.TORCHVISION_REQUIREMENT])
    if torchMissing:
        specifier = slicer_setup.TORCH_REQUIREMENT[len("torch"):]
        visionSpecifier = slicer_setup.TORCHVISION_REQUIREMENT[len("torchvision"):]
        if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=specifier,
                                   torchvisionVersionRequirement=visionSpecifier) is None:
            # the user's own "No" (or a failed install): a message, not an error box with a traceback
            raise TextSegmentError(_("PyTorch was not installed; TextSegment needs it to segment. Install it from "
                                     "the Setup section (or the PyTorch extension) when you are ready"))
    requirementsPath = _resourcePath("requirements.txt")
    try:  # a submodule: not an attribute of ``slicer`` until something imports it
        import slicer.pydeps as pydeps
    except ImportError:  # Slicer < 5.11
        pydeps = None
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):  # Slicer >= 5.12: checks, asks, installs
        requirements = pydeps.load_requirements(requirementsPath)
        try:
            pydeps.pip_ensure(requirements, requester="TextSegment", skip_packages=["torch", "torchvision"])
        except TypeError:  # an older pip_ensure without skip_packages
            pydeps.pip_ensure(requirements, requester="TextSegment")
    else:
        missing = slicer_setup.missing_requirements(slicer_setup.read_requirements(requirementsPath))
        if missing:
            slicer.util.pip_install(["-r", requirementsPath])


def _resourcePath(name):
    import os

    return os.path.join(os.path.dirname(__file__), "Resources", name)


# widget ------------------------------------------------------------------------------------------
class TextSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None
        self._outcome = None  # the last run's: DICOM SEG export and recolouring use it
        self._shown = None  # the outcome whose maps the saliency panel shows: the last run's, or a reopened scene's
        self._features = None
        self._weightsModel = None
        self._listedWeights = 0  # items of the weights list from logic.weights_choices; one more holds an unlisted value
        self._runColormap = None  # the colour map the running segmentation's saliency maps get
        self._outcomeColormap = None  # the colour map the last outcome's saliency maps show
        self._inputVolume = None  # the input last seen, to notice when the user picks another one
        self._shortcuts = []
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TextSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), self.ui.promptsEdit)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.connect("activated()", self.onApplyShortcut)
            self._shortcuts.append(shortcut)
        self.ui.promptHistoryComboBox.connect("activated(int)", self.onHistoryChosen)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.weightsComboBox.connect("currentIndexChanged(int)", self.onWeightsChosen)
        self.ui.saliencyPromptComboBox.connect("currentIndexChanged(int)", self.updateOverlay)
        self.ui.saliencyLayerSlider.connect("valueChanged(int)", self.updateOverlay)
        self.ui.combinedMapCheckBox.connect("toggled(bool)", self.updateOverlay)
        self.ui.saliencyOpacitySlider.connect("valueChanged(double)", self.updateOverlay)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self._pollTimer.connect("timeout()", self.onPoll)

        for preset in slicer_parameters.MODEL_PRESETS:
            self.ui.modelComboBox.addItem(preset, preset)
        self._fillHistory()
        self._showDevices()
        self._showDependencies()
        self.ui.robustnessLabel.text = slicer_logic.robustness_note(None)
        self.initializeParameterNode()

    def cleanup(self):
        self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._job is not None and self._jobKind == "segment":  # a download, an import or an export outlives the scene
            self.logic.cancel(self._job)
        self.ui.exportDicomSegButton.enabled = False  # its input node goes with the scene
        self._outcome = None  # its nodes go with the scene too: no recolouring or overlays of them in the next one
        self._shown = None
        self._features = None
        self.ui.saliencyPromptComboBox.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A saved scene was opened: its saliency maps of the input volume are shown as a run's are."""
        p = self._parameterNode
        if p is not None and p.inputVolume is not None:
            self._followInput(p.inputVolume)

    # parameter node ------------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:  # the volume the user is looking at, never "the first one"
            selection = slicer.app.applicationLogic().GetSelectionNode()
            active = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID() or "")
            if active is not None and active.IsA("vtkMRMLScalarVolumeNode"):
                self._parameterNode.inputVolume = active

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._inputVolume = None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        """Widgets the wrapper cannot bind (lists filled at run time) and the Apply button."""
        p = self._parameterNode
        if p is None:
            return
        combo = self.ui.modelComboBox
        index = combo.findData(p.model)
        if index < 0:  # a model the presets lack (a newer scene, the console): shown as it is, not as another one
            wasBlocked = combo.blockSignals(True)
            combo.addItem(p.model, p.model)
            combo.blockSignals(wasBlocked)
            index = combo.count - 1
        if index != combo.currentIndex:
            combo.currentIndex = index
        if p.model != self._weightsModel:  # the weights list reads the disk: only when the model changes
            self._fillWeights(p.model, p.weights)
        else:
            self._selectWeights(p.weights)
        previousInput = self._inputVolume
        if p.inputVolume is not None:  # "None" on the way from one volume to another (A removed, then B) is no change
            self._inputVolume = p.inputVolume
            if p.inputVolume is not previousInput:
                self._followInput(p.inputVolume)
        output = p.outputSegmentation
        if previousInput is not None and p.inputVolume is not None and p.inputVolume is not previousInput and output is not None:
            if not slicer_logic.output_fits_input(output, input_node=p.inputVolume):
                # the last run's output belongs to the other volume: a new run must not replace its segments
                p.outputSegmentation = None
        if self._outcome is not None and p.colormap != self._outcomeColormap:
            self._recolour(p.colormap)
        isTgcNet = p.model.startswith("tgcnet")
        self.ui.auxPromptsEdit.enabled = isTgcNet
        self.ui.auxPromptsLabel.enabled = isTgcNet
        if self._job is None:
            ready = bool(p.inputVolume) and bool(p.prompts.strip())
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = _("Segment the input volume") if ready else _("Select an input volume and type a prompt")

    def onModelChosen(self, index):
        p = self._parameterNode
        if p is None or index < 0:
            return
        model = self.ui.modelComboBox.itemData(index)
        if model == p.model:  # set from the parameter node (console, loaded scene): its weights stay
            return
        with slicer.util.NodeModify(p):
            # weights chosen for the previous model cannot load into this one; the list shows the default
            try:
                known = {weightsId for weightsId, _ in self.logic.weights_choices(model)}
            except Exception:  # a broken manifest: _fillWeights says so
                known = {""}
            if p.weights not in known:
                self._parameterNode.weights = ""
            self._parameterNode.model = model

    def onWeightsChosen(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.weights = self.ui.weightsComboBox.itemData(index) or ""

    def _fillWeights(self, model, selected):
        self._weightsModel = model
        combo = self.ui.weightsComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            error = None
            try:
                choices = self.logic.weights_choices(model)
            except Exception as exc:  # a broken manifest must not break the module
                choices = [("", _("default weights"))]
                error = str(exc)
            for weightsId, label in choices:
                combo.addItem(label, weightsId)
            self._listedWeights = len(choices)
        finally:
            combo.blockSignals(wasBlocked)
        self._selectWeights(selected)
        known = len(choices) > 1
        self.ui.weightsStatusLabel.text = error if error is not None else "" if known else _(
            "No trained weights known for {model} on this computer: import a file or download in Setup.").format(model=model)

    def _selectWeights(self, selected):
        """Show ``selected`` in the weights list; a value it does not list (a file path, an id set from the console
        or a loaded scene) gets an item of its own, after the listed ones, replaced when something else is chosen."""
        combo = self.ui.weightsComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            index = combo.findData(selected) if selected else 0
            if not 0 <= index < self._listedWeights:
                index = -1
            for extra in reversed(range(self._listedWeights, combo.count)):
                combo.removeItem(extra)
            if index < 0:
                combo.addItem(self._unlistedWeightsLabel(selected), selected)
                index = combo.count - 1
                combo.setItemData(index, str(selected), qt.Qt.ToolTipRole)
            if combo.currentIndex != index:
                combo.currentIndex = index
        finally:
            combo.blockSignals(wasBlocked)

    @staticmethod
    def _unlistedWeightsLabel(weights):
        import os

        text = str(weights)
        if os.sep in text or "/" in text or text.lower().endswith((".safetensors", ".pt", ".pth", ".ckpt")):
            return _("file: {name}").format(name=os.path.basename(text.rstrip("/" + os.sep)) or text)
        return _("{id} (not listed for this model)").format(id=text)

    # segment -------------------------------------------------------------------------------------
    def onApplyShortcut(self):
        """Ctrl+Enter starts a run; it never cancels one (typing the next prompts must not stop this run)."""
        if self._job is None:
            self.onApplyButton()

    def onApplyButton(self):
        if self._job is not None:
            self.logic.cancel(self._job)
            self.ui.applyButton.text = _("Cancelling…")
            self.ui.applyButton.enabled = False  # until _finish: the job stops at its next check
            self.ui.statusLabel.text = (_("Cancelling after the current slice…") if self._jobKind == "segment"
                                        else _("Cancelling…"))
            return
        if not self.ui.applyButton.enabled or not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            job = self.logic.segment(
                volume=p.inputVolume, prompts=p.prompts, model=p.model, weights=p.weights or None,
                aux_prompts=p.auxPrompts if p.model.startswith("tgcnet") else None, device=p.device,
                threshold=p.threshold, min_component_ml=p.minIslandMl, saliency=p.saliency,
                saliency_stage=p.saliencyStage, saliency_grid="compact" if p.compactSaliency else "source",
                segmentation_node=p.outputSegmentation, colormap=p.colormap, wait=False,
            )
        except Exception as exc:
            self._showError(_("Cannot start"), exc)
            return
        self._runColormap = p.colormap
        self._rememberPrompts(slicer_parameters.parse_prompts(p.prompts))
        self._start(job, "segment")

    def _start(self, job, kind):
        self._job, self._jobKind = job, kind
        self.ui.applyButton.text = _("Cancel")
        self.ui.applyButton.enabled = True
        for button in (self.ui.installDependenciesButton, self.ui.importWeightsButton, self.ui.downloadWeightsButton,
                       self.ui.exportDicomSegButton):  # one job at a time: a second would hide the first one's end
            button.enabled = False
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.title
        self._pollTimer.start()

    def onPoll(self):
        for event in self.logic.poll():
            job = event.job
            if job is not self._job:
                continue
            self.ui.progressBar.value = int(round(job.fraction * 100))
            if not job.cancel_token.cancelled:  # keep "Cancelling…" in view: progress already queued would hide it
                self.ui.statusLabel.text = job.message
            if job.finished:
                self._finish(job)

    def _finish(self, job):
        self._pollTimer.stop()
        self._job = None
        if self._jobKind == "weights":  # a checkpoint added: the list is read again, now or with the next parameter node
            self._weightsModel = None
        self.ui.applyButton.text = _("Apply")
        for button in (self.ui.installDependenciesButton, self.ui.importWeightsButton, self.ui.downloadWeightsButton):
            button.enabled = True
        self.ui.exportDicomSegButton.enabled = self._outcome is not None
        self._onParameterNodeModified()
        if job.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            return
        if job.state == "failed":
            self.ui.progressBar.value = 0  # not left at the fraction it failed at, as if still running
            self._showError(job.title, job.error)
            return
        if self._jobKind == "export":
            self.ui.statusLabel.text = _("DICOM SEG written to {path}").format(path=job.result)
            return
        if self._parameterNode is None:  # the scene was closed meanwhile
            return
        if self._jobKind == "segment":
            self._showOutcome(job.result)
        else:  # the weights list was read again above (_onParameterNodeModified)
            self._showDependencies()
            self.ui.statusLabel.text = _("{title}: done.").format(title=job.title)
            entry = job.result  # an import's WeightsEntry: imported to be used, so the next run loads it, not the default
            if getattr(entry, "kind", None) == "checkpoint" and getattr(entry, "id", None):
                if entry.model == self._parameterNode.model:
                    self._parameterNode.weights = entry.id
                else:
                    self.ui.statusLabel.text = _("{title}: done. These weights are for {model}: choose that model to use "
                                                 "them.").format(title=job.title, model=entry.model)

    def _showOutcome(self, outcome):
        # keep the nodes, the masks (DICOM SEG export) and the saliency maps (recolouring); let the probability maps go
        masks = dataclasses.replace(outcome.run, features=None,
                                    results=[dataclasses.replace(r, probability=None) for r in outcome.run.results])
        self._outcome = slicer_logic.SegmentOutcome(input_node=outcome.input_node, segmentation_node=outcome.segmentation_node,
                                                    run=masks, saliency_nodes=outcome.saliency_nodes,
                                                    model_name=outcome.model_name)
        self.ui.exportDicomSegButton.enabled = True
        self._features = outcome.run.features
        self._outcomeColormap = self._runColormap
        p = self._parameterNode
        current = p.inputVolume
        if current is not None and current.GetID() == outcome.input_node.GetID():
            p.outputSegmentation = outcome.segmentation_node  # the next run on this input goes into it
        # else the user picked another input during the run: its next run must not replace this one's segments
        if p.colormap != self._outcomeColormap:  # chosen during the run (no parameter change may follow)
            self._recolour(p.colormap)
        run = outcome.run
        volumes = ", ".join(f"{r.prompt}: {r.volume_ml:.1f} ml" for r in run.results)
        lines = [_("Done in {seconds:.1f} s on {device}. {volumes}").format(seconds=run.seconds, device=run.device, volumes=volumes)]
        lines += run.warnings
        self.ui.statusLabel.text = "\n".join(lines)
        self._showSaliencyOf(self._outcome)

    def onExportDicomSeg(self):
        path = qt.QFileDialog.getSaveFileName(None, _("Export DICOM SEG"), "", "DICOM (*.dcm)")
        if not path:
            return
        try:  # the save dialog has asked before replacing a file; reading the series and writing run on the worker
            job = self.logic.export_dicom_seg(self._outcome, path=path, overwrite=True, wait=False)
        except Exception as exc:
            self._showError(_("Cannot export DICOM SEG"), exc)
            return
        self._start(job, "export")

    # saliency panel ------------------------------------------------------------------------------
    def _followInput(self, inputNode):
        """The maps shown follow the input: the last run's if it segmented this volume, else those the scene
        holds for it (a saved scene opened again); another volume without maps leaves the panel as it is."""
        if self._outcome is not None and self._outcome.input_node.GetID() == inputNode.GetID():
            if self._shown is not self._outcome:
                self._showSaliencyOf(self._outcome)
            return
        saved = self.logic.outcome_in_scene(inputNode)
        if saved is not None:
            self._showSaliencyOf(saved)

    def _showSaliencyOf(self, outcome):
        """List ``outcome``'s prompts, at the layer the parameter node names (a reopened scene's, the last one seen)."""
        self._shown = outcome
        wanted = self._parameterNode.saliencyLayer if self._parameterNode is not None else ""
        combo = self.ui.saliencyPromptComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for prompt in outcome.saliency_nodes:
            combo.addItem(prompt)
        combo.blockSignals(wasBlocked)
        layers = self._layers()
        if wanted in layers:
            slider = self.ui.saliencyLayerSlider
            wasBlocked = slider.blockSignals(True)
            slider.maximum, slider.value = len(layers) - 1, layers.index(wanted)
            slider.blockSignals(wasBlocked)
        self.updateOverlay()

    def _layers(self):
        if self._shown is None or not self._shown.saliency_nodes:
            return []
        prompt = self.ui.saliencyPromptComboBox.currentText
        return [name for name in self._shown.saliency_nodes.get(prompt, {}) if name != COMBINED]

    def updateOverlay(self, *args):
        prompt = self.ui.saliencyPromptComboBox.currentText
        self.ui.robustnessLabel.text = self.logic.robustness_note(prompt=prompt or None)
        layers = self._layers()
        slider = self.ui.saliencyLayerSlider
        wasBlocked = slider.blockSignals(True)
        slider.maximum = max(0, len(layers) - 1)
        slider.blockSignals(wasBlocked)
        combined = self.ui.combinedMapCheckBox.checked
        slider.enabled = bool(layers) and not combined
        if not layers:
            self.ui.saliencyLayerLabel.text = _("Run with \"Explain\" on to see saliency maps.")
            return
        layer = COMBINED if combined else layers[min(slider.value, len(layers) - 1)]
        self.ui.saliencyLayerLabel.text = layer
        self._parameterNode.saliencyLayer = "" if combined else layer
        try:
            self.logic.show_saliency(self._shown, prompt=prompt, layer=layer,
                                     opacity=self.ui.saliencyOpacitySlider.value)
        except Exception as exc:
            self._showError(_("Cannot show the saliency map"), exc)

    def _recolour(self, colormap):
        """The last run's saliency maps in ``colormap`` (the colormap parameter changed)."""
        self._outcomeColormap = colormap  # tried once: a failure is shown once, not on every parameter change
        if self._outcome is None or self._features is None:
            return
        from TextSegmentLib.slicer_bridge import add_saliency_volumes

        try:  # recolour in place, from the maps of the last run
            for item in self._features.prompts:  # volumes the user deleted come back as new nodes: show those
                self._outcome.saliency_nodes[item.prompt] = add_saliency_volumes(
                    item, reference_node=self._outcome.input_node, context=self.logic.context, colormap=colormap)
        except Exception as exc:
            self._showError(_("Cannot use this colour map"), exc)

    # prompt history ------------------------------------------------------------------------------
    def _history(self):
        value = qt.QSettings().value(HISTORY_KEY) or []
        return [value] if isinstance(value, str) else list(value)

    def _rememberPrompts(self, prompts):
        history = list(dict.fromkeys(list(prompts) + self._history()))[:HISTORY_LENGTH]
        qt.QSettings().setValue(HISTORY_KEY, history)
        self._fillHistory()

    def _fillHistory(self):
        combo = self.ui.promptHistoryComboBox
        combo.clear()
        combo.addItem(_("Recent prompts…"))
        for prompt in self._history():
            combo.addItem(prompt)

    def onHistoryChosen(self, index):
        if index <= 0:
            return
        prompt = self.ui.promptHistoryComboBox.itemText(index)
        lines = [line for line in self._parameterNode.prompts.splitlines() if line.strip()]
        if prompt not in lines:
            self._parameterNode.prompts = "\n".join(lines + [prompt])
        self.ui.promptHistoryComboBox.currentIndex = 0

    # setup ---------------------------------------------------------------------------------------
    def _showDevices(self):
        self.ui.deviceInfoLabel.text = slicer_setup.describe_gpus(slicer_setup.probe_gpus())

    def _showDependencies(self):
        try:
            missing = missingDependencies()
        except Exception as exc:
            missing = [str(exc)]
        self.ui.dependencyStatusLabel.text = (
            _("All dependencies are installed.") if not missing
            else _("Missing: {packages}").format(packages=", ".join(missing)))

    def _ensureDependencies(self):
        try:
            missing = missingDependencies()
        except Exception as exc:  # the check itself broke (requirements.txt unreadable): the run says what is missing
            logging.warning("TextSegment cannot check its dependencies: %s", exc)
            return True
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("TextSegment needs PyTorch and a few Python packages that are not installed yet. Install them now?"),
                detailedText="\n".join(missing)):
            return False
        return self.onInstallDependencies()

    def onInstallDependencies(self):
        try:
            with slicer.util.WaitCursor():
                installDependencies()
        except Exception as exc:
            self._showError(_("Installing the dependencies failed"), exc)
            return False
        finally:
            self._showDependencies()
        return not missingDependencies()

    def onImportWeights(self):
        path = qt.QFileDialog.getOpenFileName(None, _("Import TextSegment weights"), "", "Checkpoints (*.safetensors)")
        if path:
            self._start(self.logic.import_weights(path, wait=False), "weights")

    def onDownloadWeights(self):
        from TextSegmentLib.weights import list_weights

        p = self._parameterNode
        if p is None:
            return
        weightsId = p.weights
        try:
            known = list_weights()
        except Exception as exc:  # a broken manifest
            self._showError(_("Cannot list the known weights"), exc)
            return
        if weightsId:
            entries = [s.entry for s in known if s.entry.id == weightsId]
        else:  # "default weights": the entry the manifest names as this model's default
            entries = [s.entry for s in known if s.default and s.entry.kind == "checkpoint" and s.entry.model == p.model]
            if not entries:
                slicer.util.infoDisplay(_(
                    "No default weights are known for {model}, so there is nothing to download: choose other weights "
                    "in the Weights list, or import a checkpoint file.").format(model=p.model))
                return
        if not entries:
            slicer.util.infoDisplay(_(
                "{weights} is not a known weights id (a checkpoint file is used where it lies): there is nothing to "
                "download. Choose the weights to download in the Weights list.").format(weights=weightsId))
            return
        entry = entries[0]
        size = f"{entry.size / 2**20:.0f} MiB" if entry.size else _("unknown size")
        self.ui.licenceLabel.text = _("Licence: {licence}").format(licence=entry.licence)
        if slicer.util.confirmOkCancelDisplay(
                _("Download {id} ({size})? Its licence: {licence}. The file is checked against its sha256.").format(
                    id=entry.id, size=size, licence=entry.licence)):
            self._start(self.logic.download_weights(entry.id, model_name=entry.model, wait=False), "weights")

    def _showError(self, title, error):
        if isinstance(error, TextSegmentError):
            slicer.util.errorDisplay(f"{title}: {error}")
        else:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error(details)
            slicer.util.errorDisplay(f"{title}: {error}", detailedText=details)
        self.ui.statusLabel.text = f"{title}: {error}"


# test (inside Slicer only; CI runs the same logic headless in Testing/mrml/) ---------------------
class TextSegmentTest(ScriptedLoadableModuleTest):
    """Checks a user's installation end to end: parameter node, a real model on a phantom, cancel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_parameters_survive_save_and_reload()
        self.setUp()
        self.test_segment_a_phantom_and_cancel()

    def test_parameters_survive_save_and_reload(self):
        import os
        import tempfile

        self.delayDisplay("Parameter node: wrapper and headless helper agree across save and reload")
        logic = TextSegmentLogic()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
        wrapper = logic.getParameterNode()
        wrapper.inputVolume = volume
        wrapper.prompts = "liver\nleft kidney"
        wrapper.saliency = True
        wrapper.saliencyOpacity = 0.25
        wrapper.saliencyStage = 3
        path = os.path.join(tempfile.mkdtemp(), "TextSegmentTest.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        values = slicer_parameters.read_parameters(slicer_parameters.find_parameter_node(slicer.mrmlScene, create=False))
        self.assertEqual(values["prompts"], "liver\nleft kidney")
        self.assertEqual((values["saliency"], values["saliencyOpacity"], values["saliencyStage"]), (True, 0.25, 3))
        self.assertEqual(values["inputVolume"].GetName(), "CT")
        self.assertEqual(logic.getParameterNode().saliencyStage, 3)

    def test_segment_a_phantom_and_cancel(self):
        import numpy as np

        from TextSegmentLib.errors import Cancelled
        from TextSegmentLib.phantom import make_phantom
        from TextSegmentLib.slicer_bridge import node_from_volume

        missing = missingDependencies()
        self.assertEqual(missing, [], "install the dependencies first (TextSegment module, Setup section)")
        self.delayDisplay("Segmenting a phantom with a randomly initialised freqmedclip-tiny (pipeline check only)")
        logic = TextSegmentLogic()
        phantom = make_phantom(seed=0, shape=(8, 64, 64))
        ct = node_from_volume(phantom.ct, context=logic.context, name="phantom CT")
        before = slicer.util.arrayFromVolume(ct).copy()
        outcome = logic.segment(volume=ct, prompts=["liver", "spleen"], model="freqmedclip-tiny", weights="random",
                                saliency=True, wait=True)
        segmentation = outcome.segmentation_node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["liver", "spleen"])
        self.assertEqual(sorted(outcome.saliency_nodes), ["liver", "spleen"])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(ct), before), "the input volume was changed")

        self.delayDisplay("Cancel leaves the scene unchanged")
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.segment(volume=ct, prompts=["kidney"], model="freqmedclip-tiny", weights="random", wait=False)
        job.cancel()
        with self.assertRaises(Cancelled):
            logic.wait(job, timeout=120)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        logic.shutdown()
        self.delayDisplay("TextSegment self-test passed")
