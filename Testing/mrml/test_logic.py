"""The module logic on Slicer's real MRML (slicer-core), headless: parameters, worker, jobs, cancel, batch.

The test thread plays Slicer's main thread: it submits jobs and drains them with ``poll()``.
The model is constructed (a per-pixel HU rule), so every expected mask is known exactly.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import slicer  # noqa: F401 - before TextSegmentLib: slicer-core's meta package imports this folder's modules too
import torch
import vtk
from mrml_models import BoneModel
from vtk.util import numpy_support

from TextSegmentLib.errors import Cancelled, InputError
from TextSegmentLib.io import read_label_map
from TextSegmentLib.progress import CancelToken
from TextSegmentLib.slicer_bridge import SALIENCY_ATTRIBUTE, export_segmentation, node_from_volume
from TextSegmentLib.slicer_logic import SegmentationLogic, robustness_note
from TextSegmentLib.slicer_parameters import (
    MODEL_PRESETS,
    PARAMETERS,
    find_parameter_node,
    parse_aux_prompts,
    parse_prompts,
    read_parameters,
    write_parameters,
)
from TextSegmentLib.slicer_setup import TORCH_REQUIREMENT, describe_gpus, missing_requirements, probe_gpus
from TextSegmentLib.volume import Volume

REPO = Path(__file__).resolve().parents[2]


def _ct(direction=np.diag([-1.0, 1.0, 1.0])) -> tuple[Volume, np.ndarray]:
    """A soft-tissue slab with a bone box off-centre, on a flipped grid (32×32 slices: the model grid exactly)."""
    hu = np.full((6, 32, 32), 40, np.int16)
    bone = np.zeros(hu.shape, bool)
    bone[1:5, 4:12, 18:28] = True
    hu[bone] = 1200
    return Volume(hu, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 3.0), direction=direction), bone


@pytest.fixture
def logic(context):
    logic = SegmentationLogic(context=context)
    yield logic
    logic.shutdown()


@pytest.fixture
def ct_node(context):
    volume, _ = _ct()
    return node_from_volume(volume, context=context, name="CT")


def _scene_ids(context) -> list[str]:
    scene = context.scene
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _voxels_and_matrix(node) -> tuple[np.ndarray, np.ndarray]:
    values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return values, np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_masks(segmentation_node, reference_node, context, tmp_path) -> np.ndarray:
    """The label map Slicer's own export makes of the segmentation, on the reference grid."""
    path = export_segmentation(segmentation_node, tmp_path / "labels.nii.gz", context=context,
                               reference_node=reference_node, overwrite=True)
    return read_label_map(path).array


# parameters ------------------------------------------------------------------------------------
def test_parameters_default_and_are_stored_as_the_wrapper_stores_them(context, ct_node):
    node = find_parameter_node(context.scene)
    # what ScriptedLoadableModuleLogic.getParameterNode looks for: a singleton tagged with the module name
    assert node.GetAttribute("ModuleName") == "TextSegment" and node.GetSingletonTag() == "TextSegment"
    assert context.scene.GetSingletonNode("TextSegment", "vtkMRMLScriptedModuleNode") is node
    assert find_parameter_node(context.scene) is node  # found again, not duplicated
    values = read_parameters(node)
    assert values == {p.name: p.default for p in PARAMETERS}

    write_parameters(node, {"inputVolume": ct_node, "saliency": True, "saliencyOpacity": 0.25, "saliencyStage": 2})
    # parameterNodeWrapper's serialisers: "True"/"False", str(number), node reference + empty parameter
    assert node.GetParameter("saliency") == "True" and node.GetParameter("combinedMap") == "True"
    assert node.GetParameter("saliencyOpacity") == "0.25" and node.GetParameter("saliencyStage") == "2"
    assert node.HasParameter("inputVolume") and node.GetParameter("inputVolume") == ""
    assert node.GetNodeReferenceID("inputVolume") == ct_node.GetID()


@pytest.mark.parametrize("suffix", [".mrml", ".mrb"])
def test_parameters_survive_save_and_reload(context, ct_node, tmp_path, suffix):
    from TextSegmentLib.slicer_bridge import headless_context

    output = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Liver result")
    chosen = {
        "inputVolume": ct_node, "outputSegmentation": output, "prompts": "liver\nleft kidney \"cyst\" <&>",
        "auxPrompts": "", "model": "tgcnet-tiny", "weights": "my-weights", "device": "cpu", "threshold": 0.35,
        "minIslandMl": 2.5,
        "saliency": True, "saliencyStage": 3, "compactSaliency": False, "saliencyLayer": "vit.11",
        "saliencyOpacity": 0.7, "colormap": "Viridis", "combinedMap": False,
    }
    assert set(chosen) == {p.name for p in PARAMETERS}
    write_parameters(find_parameter_node(context.scene), chosen)

    if suffix == ".mrml":
        path = tmp_path / "scene.mrml"
        context.scene.SetURL(str(path))
        assert context.scene.Commit()
        reloaded = headless_context()
        reloaded.scene.SetURL(str(path))
        assert reloaded.scene.Import()
    else:
        reloaded = _saved_and_reopened(context, tmp_path)
    try:
        assert reloaded.scene.GetSingletonNode("TextSegment", "vtkMRMLScriptedModuleNode") is not None
        values = read_parameters(find_parameter_node(reloaded.scene, create=False))
        for name, value in chosen.items():
            if name in ("inputVolume", "outputSegmentation"):
                assert values[name] is not None and values[name].GetName() == value.GetName(), name
                assert values[name].GetScene() is reloaded.scene
            else:
                assert values[name] == value, name
        if suffix == ".mrb":  # the bundle also carries the voxels the reference points at
            assert values["inputVolume"].GetImageData().GetDimensions() == (32, 32, 6)
    finally:
        reloaded.scene.Clear(True)


def _saved_and_reopened(context, tmp_path):
    """The scene saved as a Slicer data bundle (.mrb, voxels included) and opened in a new headless scene."""
    from TextSegmentLib.slicer_bridge import headless_context

    bundle, path = tmp_path / "bundle", tmp_path / "scene.mrb"
    bundle.mkdir()
    assert context.app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    assert context.app_logic.Zip(str(path), str(bundle))
    reloaded = headless_context()
    (tmp_path / "unpacked").mkdir()
    assert reloaded.app_logic.OpenSlicerDataBundle(str(path), str(tmp_path / "unpacked"))
    return reloaded


def test_saliency_maps_of_a_saved_scene_are_found_again_when_it_is_reopened(context, ct_node, tmp_path):
    """A scene saved with a run's saliency maps reopened with an empty saliency panel: the maps were in the
    scene, but the widget knew only the maps of a run made in this session."""
    from TextSegmentLib.slicer_bridge import add_saliency_volumes

    ct = _ct()[0]
    ramp = ct.with_array(np.linspace(0, 1, ct.array.size, dtype=np.float32).reshape(ct.shape))
    for prompt in ("liver", "left kidney"):
        add_saliency_volumes({"vit.3": ramp, "vit.11": ramp, "combined": ramp}, reference_node=ct_node,
                             context=context, prompt=prompt)
    other = node_from_volume(ct, context=context, name="another CT")
    add_saliency_volumes({"vit.3": ramp}, reference_node=other, context=context, prompt="spleen")
    reloaded = _saved_and_reopened(context, tmp_path)
    logic = SegmentationLogic(context=reloaded)
    try:
        ct_again = reloaded.scene.GetFirstNodeByName(ct_node.GetName())
        outcome = logic.outcome_in_scene(ct_again)
        assert {prompt: list(layers) for prompt, layers in outcome.saliency_nodes.items()} == {
            "liver": ["vit.3", "vit.11", "combined"], "left kidney": ["vit.3", "vit.11", "combined"]}
        assert outcome.run is None and outcome.warnings == []
        shown = logic.show_saliency(outcome, prompt="left kidney", layer="vit.11")
        assert shown.GetScene() is reloaded.scene and shown.GetName() == "left kidney saliency vit.11"
        assert shown.GetImageData().GetDimensions() == (32, 32, 6)  # the voxels came back with the bundle
        assert list(logic.outcome_in_scene(reloaded.scene.GetFirstNodeByName("another CT")).saliency_nodes) == ["spleen"]
        assert logic.outcome_in_scene(node_from_volume(ct, context=reloaded, name="CT without maps")) is None
        with pytest.raises(InputError, match="read back from the scene"):  # the run's masks are not in a scene
            logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm")
    finally:
        logic.shutdown()
        reloaded.scene.Clear(True)


def test_bad_parameter_values_are_refused(context, ct_node):
    node = find_parameter_node(context.scene)
    for values, message in (
        ({"device": "gpu"}, "one of"), ({"saliencyStage": 4}, "between"), ({"threshold": "0.5"}, "float"),
        ({"outputSegmentation": ct_node}, "vtkMRMLSegmentationNode"), ({"colour": "Inferno"}, "unknown"),
    ):
        with pytest.raises(InputError, match=message):
            write_parameters(node, values)
    assert read_parameters(node)["device"] == "auto"


def test_logic_parameter_shortcuts(logic, ct_node):
    logic.set_parameters(inputVolume=ct_node, prompts="spleen")
    assert logic.parameters()["inputVolume"] is ct_node and logic.parameters()["prompts"] == "spleen"


# segmenting ------------------------------------------------------------------------------------
def test_blocking_segment_adds_one_segment_per_prompt_and_never_touches_the_input(logic, context, ct_node, tmp_path):
    _, bone = _ct()
    voxels, matrix = _voxels_and_matrix(ct_node)
    model = BoneModel()
    outcome = logic.segment(volume=ct_node, prompts="bone\n\nsoft tissue\nbone", model=model, device="cpu", wait=True)
    segmentation = outcome.segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["bone", "soft tissue"]
    labels = _segment_masks(outcome.segmentation_node, ct_node, context, tmp_path)
    np.testing.assert_array_equal(labels == 1, bone)
    np.testing.assert_array_equal(labels == 2, ~bone)
    after_voxels, after_matrix = _voxels_and_matrix(ct_node)
    np.testing.assert_array_equal(after_voxels, voxels)
    np.testing.assert_array_equal(after_matrix, matrix)
    assert set(model.threads) == {threading.current_thread().name}  # wait=True runs on the caller's thread

    # re-running into the same node replaces the segment instead of adding a second one
    again = logic.segment(volume=ct_node, prompts=["bone"], model=model, device="cpu",
                          segmentation_node=outcome.segmentation_node)
    assert again.segmentation_node is outcome.segmentation_node
    assert segmentation.GetNumberOfSegments() == 2


def test_islands_under_the_chosen_volume_are_dropped(logic, context, ct_node, tmp_path):
    _, bone = _ct()
    bone_ml = bone.sum() * 0.8 * 0.8 * 2.0 / 1000.0  # 0.41 mL, one island
    kept = logic.segment(volume=ct_node, prompts="bone", model=BoneModel(), device="cpu", min_component_ml=bone_ml / 2)
    np.testing.assert_array_equal(_segment_masks(kept.segmentation_node, ct_node, context, tmp_path) == 1, bone)
    dropped = logic.segment(volume=ct_node, prompts="bone", model=BoneModel(), device="cpu", min_component_ml=bone_ml * 2)
    assert not (_segment_masks(dropped.segmentation_node, ct_node, context, tmp_path) == 1).any()
    assert any("nothing found" in w for w in dropped.warnings)


def test_aux_prompts_for_a_model_that_ignores_them_get_the_engines_message(logic, context, ct_node, shared_data,
                                                                          tmp_path):
    # the model ignored them, yet the run recorded them; the study batch goes through the same check
    refused = "BoneModel does not use auxiliary prompts .*for TGC-Net"
    with pytest.raises(InputError, match=refused):
        logic.segment(volume=ct_node, prompts="bone", aux_prompts="dense cortical bone", model=BoneModel(),
                      device="cpu")
    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    with pytest.raises(InputError, match=refused):
        logic.segment_dicom_study(dicom_dir=study, prompts="bone", aux_prompts="dense cortical bone",
                                  output_dir=tmp_path / "out", model=BoneModel(), device="cpu")
    assert not (tmp_path / "out").exists()
    # the module's box left empty (or blank lines only) runs as without it
    outcome = logic.segment(volume=ct_node, prompts="bone\nsoft tissue", aux_prompts="\n \n", model=BoneModel(),
                            device="cpu")
    assert outcome.segmentation_node.GetSegmentation().GetNumberOfSegments() == 2


def test_no_volume_selected_is_an_error(logic):
    with pytest.raises(InputError, match="no input volume"):
        logic.segment(volume=None, prompts=["bone"], model=BoneModel())
    with pytest.raises(InputError, match="no prompt"):
        parse_prompts(" \n  \n")


def _closed_surface_segmentation(context):
    """A segmentation holding an imported model: closed surfaces are its source representation."""
    node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "imported model")
    node.GetSegmentation().SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "tumour model", (1.0, 0.0, 0.0))
    return node


@pytest.mark.parametrize("case", ["label map", "segmentation as input", "engine Volume", "input not in the scene",
                                  "volume as output", "closed-surface output", "output not in the scene",
                                  "unknown colour map"])
def test_nodes_and_options_a_run_cannot_use_are_refused_before_it_runs(logic, context, ct_node, case):
    """These failed only once the run was over (a raw AttributeError, TypeError or RuntimeError for most),
    the closed-surface output after an empty segment had been added to it."""
    volume, output, colormap = ct_node, None, "Inferno"
    if case == "label map":
        volume = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        node_from_volume(_ct()[0].with_array(_ct()[1].astype(np.uint8)), context=context, name="labels", node=volume)
    elif case == "segmentation as input":
        volume = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "a segmentation")
    elif case == "engine Volume":
        volume = _ct()[0]
    elif case == "input not in the scene":
        volume = node_from_volume(_ct()[0], context=context, name="loose", node=slicer.vtkMRMLScalarVolumeNode())
    elif case == "volume as output":
        output = node_from_volume(_ct()[0], context=context, name="another CT")
    elif case == "closed-surface output":
        output = _closed_surface_segmentation(context)
    elif case == "output not in the scene":
        output = slicer.vtkMRMLSegmentationNode()
    else:
        colormap = "NoSuchMap"
    before = _scene_ids(context)
    model = BoneModel()
    with pytest.raises(InputError, match="label map|not a volume|volume node|not in the scene|not a segmentation|Closed surface|NoSuchMap"):
        logic.segment(volume=volume, prompts=["bone"], model=model, device="cpu", segmentation_node=output,
                      saliency=True, colormap=colormap, wait=False)
    assert model.threads == [] and logic.running == []  # refused on the spot, nothing computed
    assert _scene_ids(context) == before
    if case == "closed-surface output":
        segmentation = output.GetSegmentation()
        assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["tumour model"]


class TwoLayerModel(BoneModel):
    """BoneModel with a second feature tap, so a run can explain one layer or both."""

    tap_names = ("pixels", "halved")

    def forward(self, images, text, *, taps=None):
        output = super().forward(images, text, taps=taps)
        if taps:
            output.taps["halved"] = images * 0.5
        return output


def test_a_rerun_explaining_fewer_layers_leaves_no_map_of_the_older_run(logic, context, ct_node):
    first = logic.segment(volume=ct_node, prompts=["bone"], model=TwoLayerModel(), device="cpu", saliency=True)
    assert set(first.saliency_nodes["bone"]) == {"pixels", "halved", "combined"}
    stale = first.saliency_nodes["bone"]["halved"]
    stale_display = stale.GetDisplayNodeID()
    count = context.scene.GetNumberOfNodes()
    again = logic.segment(volume=ct_node, prompts=["bone"], model=TwoLayerModel(), device="cpu", saliency=True,
                          saliency_layers="pixels", segmentation_node=first.segmentation_node)
    assert set(again.saliency_nodes["bone"]) == {"pixels", "combined"}
    assert stale.GetScene() is None and context.scene.GetNodeByID(stale_display) is None  # no orphan display node
    assert context.scene.GetNumberOfNodes() == count - 2
    keys = [context.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetAttribute(SALIENCY_ATTRIBUTE)
            for i in range(context.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert sorted(k for k in keys if k) == ["bone|combined", "bone|pixels"]


def test_a_rerun_without_saliency_removes_the_maps_that_explained_the_replaced_mask(logic, context, ct_node):
    # they were left in the scene, looking like the explanation of the new mask
    first = logic.segment(volume=ct_node, prompts=["bone", "soft tissue"], model=TwoLayerModel(), device="cpu",
                          saliency=True)
    old = list(first.saliency_nodes["bone"].values())
    kept = list(first.saliency_nodes["soft tissue"].values())
    again = logic.segment(volume=ct_node, prompts=["bone"], model=TwoLayerModel(), device="cpu",
                          segmentation_node=first.segmentation_node)
    assert again.saliency_nodes == {}
    assert all(node.GetScene() is None for node in old)
    assert all(node.GetScene() is context.scene for node in kept)  # another prompt's maps still explain its mask
    assert any("removed the saliency maps of 'bone'" in warning for warning in again.warnings)
    quiet = logic.segment(volume=ct_node, prompts=["bone"], model=TwoLayerModel(), device="cpu",
                          segmentation_node=first.segmentation_node)
    assert not any("saliency" in warning for warning in quiet.warnings)  # nothing left to remove, nothing said


def test_async_job_runs_on_one_persistent_worker_and_changes_the_scene_only_in_poll(logic, context, ct_node):
    gate = threading.Event()
    model = BoneModel(gate)
    before = _scene_ids(context)
    job = logic.segment(volume=ct_node, prompts=["bone"], model=model, device="cpu", wait=False)
    assert model.started.wait(10)
    assert job in logic.running and not job.finished
    gate.set()
    finished = threading.Event()
    logic.submit("marker", lambda progress, cancel: finished.set())  # runs after the segmentation, in order
    assert finished.wait(10)
    assert _scene_ids(context) == before  # computed, but nothing applied before the main thread polls

    fractions = []
    while not job.finished:
        fractions += [e.job.fraction for e in logic.poll() if e.kind == "progress" and e.job is job]
    assert job.state == "done" and job.fraction == 1.0
    assert fractions == sorted(fractions) and fractions
    assert job.result.segmentation_node.GetScene() is context.scene
    assert len(_scene_ids(context)) > len(before)

    second = logic.segment(volume=ct_node, prompts=["soft tissue"], model=model, device="cpu", wait=False)
    logic.wait(second, timeout=20)
    worker = logic.worker.thread
    assert worker is not None and worker.is_alive()
    assert set(model.threads) == {worker.name} and worker is not threading.current_thread()


@pytest.mark.parametrize("by", ["logic.cancel()", "the caller's token"])
def test_cancel_mid_run_leaves_the_scene_unchanged(logic, context, ct_node, by):
    gate = threading.Event()
    model = BoneModel(gate)
    token = CancelToken()
    before = _scene_ids(context)
    job = logic.segment(volume=ct_node, prompts=["bone", "soft tissue"], model=model, device="cpu",
                        batch_size=1, saliency=True, wait=False, cancel=token)
    assert model.started.wait(10)
    if by == "logic.cancel()":
        logic.cancel()
    else:
        token.cancel()  # with wait=False too, the caller's token cancels the job
    gate.set()
    with pytest.raises(Cancelled):
        logic.wait(job, timeout=20)
    assert job.state == "cancelled" and job.result is None
    assert _scene_ids(context) == before
    assert len(model.threads) < 6  # it stopped between slices instead of running to the end


def test_async_segment_calls_the_callers_progress_from_poll(logic, ct_node):
    calls = []
    job = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(), device="cpu", wait=False,
                        progress=lambda fraction, message="": calls.append((fraction, threading.current_thread())))
    logic.wait(job, timeout=20)
    assert calls and {thread for _, thread in calls} == {threading.current_thread()}  # the main thread, via poll()
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)


def test_cancel_after_computing_but_before_poll_still_changes_nothing(logic, context, ct_node):
    before = _scene_ids(context)
    job = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(), device="cpu", wait=False)
    computed = threading.Event()
    logic.submit("marker", lambda progress, cancel: computed.set())
    assert computed.wait(20)
    job.cancel()
    while not job.finished:
        logic.poll()
    assert job.state == "cancelled"
    assert _scene_ids(context) == before


def test_cancel_after_files_were_written_says_the_job_is_done(logic, tmp_path):
    """A cancel that came after an export, import or download had written its file said "Cancelled; nothing was
    changed" while the file was there: too late to undo, the job is done."""
    from TextSegmentLib.slicer_jobs import CANCELLED, DONE

    written = tmp_path / "weights.safetensors"
    job = logic.submit("Importing weights", lambda progress, cancel: written.write_bytes(b"imported"), writes_files=True)
    computed = threading.Event()
    logic.submit("marker", lambda progress, cancel: computed.set())
    assert computed.wait(20)
    job.cancel()  # the file is written already
    while not job.finished:
        logic.poll()
    assert (job.state, job.message) == (DONE, "done") and written.read_bytes() == b"imported"
    scene_only = logic.submit("Adding nodes", lambda progress, cancel: None, apply=lambda value: pytest.fail("applied"))
    scene_only.cancel()
    while not scene_only.finished:
        logic.poll()
    assert scene_only.state == CANCELLED  # its changes come in apply, which a cancel still skips
    # the logic's own file-writing jobs say so
    assert logic.import_weights(path=tmp_path / "missing.safetensors", wait=False).writes_files


def test_blocking_cancel_raises_before_anything_is_added(logic, context, ct_node):
    before = _scene_ids(context)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(), device="cpu", cancel=token)
    assert _scene_ids(context) == before


def test_input_removed_while_running_fails_without_adding_anything(logic, context, ct_node):
    gate = threading.Event()
    job = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(gate), device="cpu", wait=False)
    context.scene.RemoveNode(ct_node)
    before = _scene_ids(context)
    gate.set()
    with pytest.raises(InputError, match="was removed"):
        logic.wait(job, timeout=20)
    assert job.state == "failed" and "was removed" in job.message
    assert _scene_ids(context) == before


def test_prompts_that_are_not_text_are_refused():
    """Bytes became one prompt per byte value ("98", "111", ...), None a segment named "None"."""
    for prompts in (b"bone", [None], ["bone", 3]):
        with pytest.raises(InputError, match="prompts must be text"):
            parse_prompts(prompts)
    assert parse_prompts(p for p in ["bone", "Bone", "soft tissue"]) == ["bone", "soft tissue"]  # any iterable of text


def test_a_hand_edited_parameter_reads_as_its_default_with_a_warning(context, caplog):
    """A raw ValueError broke the module on a scene whose threshold read "abc"; a stage of 7 passed unchecked."""
    node = find_parameter_node(context.scene)
    write_parameters(node, {"threshold": 0.3, "saliencyStage": 2, "colormap": "Viridis"})
    node.SetParameter("threshold", "abc")
    node.SetParameter("saliencyStage", "7")
    node.SetParameter("colormap", "Rainbow")
    values = read_parameters(node)
    assert (values["threshold"], values["saliencyStage"], values["colormap"]) == (0.5, 1, "Inferno")
    assert all(name in caplog.text for name in ("'threshold'", "'saliencyStage'", "'colormap'"))


def test_an_output_removed_while_running_gets_a_new_one_and_the_outcome_says_so(logic, context, ct_node):
    """The warning went only to the log; the widget shows ``outcome.warnings``."""
    gate = threading.Event()
    output = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    job = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(gate), device="cpu",
                        segmentation_node=output, wait=False)
    context.scene.RemoveNode(output)
    gate.set()
    outcome = logic.wait(job, timeout=20)
    assert outcome.segmentation_node is not output and outcome.segmentation_node.GetScene() is context.scene
    assert any("was removed" in w and "mine" in w for w in outcome.warnings)


@pytest.mark.parametrize("change", ["voxels written in place", "spacing edited"])
def test_input_changed_while_running_fails_without_adding_anything(logic, context, ct_node, change):
    """Masks of the old voxels were added in silence; an edited spacing gave 'must come from a run on that
    volume' (it did) after the saliency colour table had already been added."""
    gate = threading.Event()
    job = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(gate), device="cpu", saliency=True, wait=False)
    if change == "voxels written in place":  # e.g. a filter module run with the CT as its output
        numpy_support.vtk_to_numpy(ct_node.GetImageData().GetPointData().GetScalars())[:] = 1200
        ct_node.GetImageData().Modified()
    else:
        ct_node.SetSpacing(1.0, 1.0, 1.0)
    before = _scene_ids(context)
    gate.set()
    with pytest.raises(InputError, match="'CT' was changed .* while it was being segmented.*nothing was added"):
        logic.wait(job, timeout=20)
    assert _scene_ids(context) == before


def test_saliency_volumes_per_prompt_and_layer_and_the_overlay(logic, context, ct_node):
    outcome = logic.segment(volume=ct_node, prompts=["bone", "soft tissue"], model=BoneModel(), device="cpu",
                            saliency=True, saliency_stage=1)
    assert set(outcome.saliency_nodes) == {"bone", "soft tissue"}
    for prompt, layers in outcome.saliency_nodes.items():
        assert set(layers) == {"pixels", "combined"}
        for layer, node in layers.items():
            assert node.GetAttribute(SALIENCY_ATTRIBUTE) == f"{prompt}|{layer}"
    shown = logic.show_saliency(outcome, prompt="bone", opacity=0.3)
    assert shown is outcome.saliency_nodes["bone"]["combined"]
    composite = context.scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == ct_node.GetID()
    assert composite.GetForegroundVolumeID() == shown.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.3)
    with pytest.raises(InputError, match="no saliency layer"):
        logic.show_saliency(outcome, prompt="bone", layer="vit.3")


def test_showing_a_saliency_volume_the_user_deleted_is_an_error_not_blank_views(logic, context, ct_node):
    outcome = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(), device="cpu", saliency=True)
    context.scene.RemoveNode(outcome.saliency_nodes["bone"]["combined"])
    with pytest.raises(InputError, match="was removed"):
        logic.show_saliency(outcome, prompt="bone", layer="combined")
    context.scene.RemoveNode(ct_node)
    with pytest.raises(InputError, match="was removed"):
        logic.show_saliency(outcome, prompt="bone", layer="pixels")


def test_prompts_that_differ_only_in_case_give_one_segment(logic, ct_node):
    assert parse_prompts("Liver\nliver \n LIVER\nspleen") == ["Liver", "spleen"]
    outcome = logic.segment(volume=ct_node, prompts="bone\nBone", model=BoneModel(), device="cpu")
    segmentation = outcome.segmentation_node.GetSegmentation()
    assert [r.prompt for r in outcome.run.results] == ["bone"] and segmentation.GetNumberOfSegments() == 1


def test_a_model_object_is_named_by_its_preset_not_its_class(logic, ct_node):
    """DICOM SEG records ``outcome.model_name`` as the algorithm: "FreqMedCLIP" would not tell tiny from base."""
    model = BoneModel()
    model.config = SimpleNamespace(**vars(model.config), name="bone-tiny")
    assert logic.segment(volume=ct_node, prompts="bone", model=model, device="cpu").model_name == "bone-tiny"
    assert logic.segment(volume=ct_node, prompts="bone", model=BoneModel(), device="cpu").model_name == "BoneModel"


def test_models_are_loaded_once_and_out_of_memory_falls_back_to_the_cpu(context, ct_node):
    calls = []

    def loader(name, *, weights, device):
        calls.append((name, weights, device))
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return BoneModel()

    logic = SegmentationLogic(context=context, model_loader=loader)
    try:
        outcome = logic.segment(volume=ct_node, prompts=["bone"], model="bone-model", device="cuda")
        assert calls == [("bone-model", None, "cuda"), ("bone-model", None, "cpu")]
        assert any("CPU" in w for w in outcome.warnings) and outcome.run.device == "cpu"
        logic.segment(volume=ct_node, prompts=["soft tissue"], model="bone-model", device="cpu")
        assert len(calls) == 2  # cached
    finally:
        logic.shutdown()


def test_a_weights_file_rewritten_in_place_is_loaded_again(context, ct_node, tmp_path):
    checkpoint = tmp_path / "mine.safetensors"
    checkpoint.write_bytes(b"first export")
    calls = []

    def loader(name, *, weights, device):
        calls.append(Path(weights).read_bytes())
        return BoneModel()

    logic = SegmentationLogic(context=context, model_loader=loader)
    try:
        for _ in range(2):
            logic.segment(volume=ct_node, prompts=["bone"], model="bone-model", weights=str(checkpoint), device="cpu")
        assert calls == [b"first export"]  # kept while the file stays the same
        checkpoint.write_bytes(b"second, longer export")  # the user's training run exported again
        logic.segment(volume=ct_node, prompts=["bone"], model="bone-model", weights=str(checkpoint), device="cpu")
        assert calls == [b"first export", b"second, longer export"]
    finally:
        logic.shutdown()


def test_study_batch_through_the_logic_asynchronously(logic, shared_data, tmp_path):
    from TextSegmentLib.study_batch import REPORT

    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    threads = []
    job = logic.segment_dicom_study(dicom_dir=study, prompts=["bone"], output_dir=tmp_path / "out", model=BoneModel(),
                                    device="cpu", wait=False,
                                    progress=lambda fraction, message="": threads.append(threading.current_thread()))
    report = logic.wait(job, timeout=60)
    assert [s.status for s in report.series] == ["ok"]
    assert threads and set(threads) == {threading.current_thread()}  # the caller's progress, called by poll()
    assert (tmp_path / "out" / REPORT).is_file() and (tmp_path / "out" / report.series[0].folder / "seg.dcm").is_file()
    with pytest.raises(InputError, match="inside Slicer"):
        logic.segment_dicom_study(dicom_dir=study, prompts=["bone"], output_dir=tmp_path / "o2", model=BoneModel(),
                                  add_to_dicom_database=True)
    token = CancelToken()
    token.cancel()
    job = logic.segment_dicom_study(dicom_dir=study, prompts=["bone"], output_dir=tmp_path / "o3", model=BoneModel(),
                                    device="cpu", wait=False, cancel=token)
    with pytest.raises(Cancelled):
        logic.wait(job, timeout=60)
    assert not (tmp_path / "o3").exists()


# helpers the widget uses -------------------------------------------------------------------------
def test_prompt_and_aux_parsing():
    assert parse_prompts("  liver \n\n left   kidney\nliver\n") == ["liver", "left kidney"]
    assert parse_aux_prompts("", count=2) is None
    assert parse_aux_prompts("large organ\n\n", count=2) == ["large organ", None]
    with pytest.raises(InputError, match="one line per prompt"):
        parse_aux_prompts("a\nb\nc", count=2)
    # descriptions typed line for line beside prompts with a blank and a repeated line: paired by line
    typed = "liver\n\nspleen\nLiver"
    assert parse_aux_prompts("big organ\n\nsmall organ\nagain", count=2, prompts=typed) == ["big organ", "small organ"]
    assert parse_aux_prompts("big organ\nsmall organ", count=2, prompts=typed) == ["big organ", "small organ"]


def test_gpu_probe_reads_nvidia_smi_and_survives_its_absence():
    class Done:
        returncode, stdout = 0, "0, NVIDIA RTX A4000, 16376, 15000\n1, Tesla T4, 15360, 100\n"

    gpus = probe_gpus(run=lambda *a, **k: Done())
    assert gpus == [{"index": 0, "name": "NVIDIA RTX A4000", "total_mib": 16376, "free_mib": 15000},
                    {"index": 1, "name": "Tesla T4", "total_mib": 15360, "free_mib": 100}]
    assert "cuda:0 NVIDIA RTX A4000: 14.6 of 16.0 GiB free" in describe_gpus(gpus)

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert probe_gpus(run=missing) == []
    assert "CPU" in describe_gpus([])


def test_missing_requirements_checks_names_and_pins():
    assert missing_requirements(["numpy>=1.0", "pytest>=1"]) == []
    import numpy

    assert missing_requirements([f"numpy>{numpy.__version__}"]) == [f"numpy>{numpy.__version__} (installed: {numpy.__version__})"]
    assert missing_requirements(["surely-not-installed-textsegment-x>=1"]) == ["surely-not-installed-textsegment-x>=1"]


def test_gpu_probe_keeps_a_gpu_whose_memory_nvidia_smi_does_not_report():
    class Done:  # a DGX Spark (GB10, unified memory): nvidia-smi has no memory figures for it
        returncode, stdout = 0, "0, NVIDIA GB10, [N/A], [N/A]\n"

    gpus = probe_gpus(run=lambda *a, **k: Done())
    assert gpus == [{"index": 0, "name": "NVIDIA GB10", "total_mib": None, "free_mib": None}]
    text = describe_gpus(gpus)
    assert "cuda:0 NVIDIA GB10" in text and "CPU" not in text


def test_missing_requirements_skips_requirements_whose_marker_does_not_apply():
    assert missing_requirements(['surely-not-installed-textsegment-x>=1; python_version < "3"']) == []
    assert missing_requirements(['surely-not-installed-textsegment-x>=1; python_version >= "3"']) == [
        'surely-not-installed-textsegment-x>=1; python_version >= "3"']
    assert missing_requirements(['numpy[extra]>=1.0; python_version >= "3"']) == []


def _module_on_stand_ins(monkeypatch, calls: list, *, torch_installed: bool = True):
    """TextSegment.py imported on stand-ins for Slicer, its pydeps and the PyTorch extension (records calls)."""
    import importlib.util
    import sys
    import types

    fake = types.ModuleType("slicer")
    fake.vtkMRMLScalarVolumeNode = fake.vtkMRMLSegmentationNode = object
    fake.util = types.SimpleNamespace(pip_install=lambda *a, **k: calls.append(("pip_install", a, k)))
    pydeps = types.ModuleType("slicer.pydeps")
    pydeps.load_requirements = lambda path: ["loaded " + Path(path).name]
    pydeps.pip_ensure = lambda requirements, **k: calls.append(("pip_ensure", requirements, k))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    wrapper.parameterNodeWrapper = lambda cls: cls
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleTest = object
    scripted.ScriptedLoadableModuleWidget, scripted.ScriptedLoadableModuleLogic = type("W", (), {}), type("L", (), {})
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("M", (), {})
    torch_utils = types.ModuleType("PyTorchUtils")
    torch_utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda **k: calls.append(("installTorch", k)) or (object() if torch_installed else None))
    for name, module in {"qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk"), "slicer": fake,
                         "slicer.pydeps": pydeps, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                         "slicer.ScriptedLoadableModule": scripted, "slicer.util": util,
                         "PyTorchUtils": torch_utils}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("TextSegment_setup_under_test", REPO / "TextSegment" / "TextSegment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_dependencies_uses_slicer_pydeps_even_when_not_imported_yet(monkeypatch):
    """``slicer.pydeps`` (Slicer >= 5.11) is a submodule: it is no attribute of ``slicer`` until imported."""
    calls = []
    module = _module_on_stand_ins(monkeypatch, calls)
    module.installDependencies()
    assert [c for c in calls if c[0] != "installTorch"] == [
        ("pip_ensure", ["loaded requirements.txt"], {"requester": "TextSegment", "skip_packages": ["torch", "torchvision"]})]


def test_declining_the_pytorch_install_is_a_message_not_a_traceback(monkeypatch):
    """A RuntimeError made the module show an error box with a traceback for the user's own 'No'."""
    from TextSegmentLib.errors import TextSegmentError

    calls = []
    module = _module_on_stand_ins(monkeypatch, calls, torch_installed=False)
    monkeypatch.setattr(module.slicer_setup, "missing_requirements", lambda requirements: list(requirements))
    with pytest.raises(TextSegmentError, match="PyTorch was not installed"):
        module.installDependencies()
    assert [c[0] for c in calls] == ["installTorch"]  # and no pip install after it


def test_robustness_note_uses_the_figures_the_weights_carry():
    class Info:
        metadata = {"metrics": {"pss": 0.12, "prompt_swap_dice": 0.87, "prompts": {"liver": {"pss": 0.05}}}}

    class Source:
        info = Info()

    class Model:
        weights_source = Source()

    note = robustness_note(Model())
    assert "of these weights" in note and "0.12" in note and "0.87" in note
    own = robustness_note(Model(), prompt="liver")
    assert "'liver'" in own and "0.05" in own and "0.12" not in own
    assert "0.12" in robustness_note(Model(), prompt="spleen")  # no figures of its own: the weights' figures
    assert "No prompt-robustness figures" in robustness_note(object())


def test_presets_and_torch_pin_match_the_engine_and_pyproject():
    import tomllib

    from TextSegmentLib.models.registry import list_models

    assert sorted(MODEL_PRESETS) == list_models()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert TORCH_REQUIREMENT in dependencies


def test_saliency_explains_the_masks_at_the_modules_threshold(logic, ct_node):
    """The maps' target is the mask at the slider's threshold, as ``segment --saliency``'s (it was 0.5 always)."""
    outcome = logic.segment(volume=ct_node, prompts=["bone"], model=BoneModel(), device="cpu", threshold=0.3,
                            saliency=True)
    assert outcome.run.features.config.threshold == 0.3
    assert "probability >= 0.3" in outcome.run.features[0].legend["combined"]["target"]
