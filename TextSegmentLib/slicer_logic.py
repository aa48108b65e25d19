"""The Slicer module's logic without Qt: segmentation, saliency, DICOM SEG export, study batch, weights.

Usable from Slicer's Python console, from ``Slicer --python-script`` and, on ``slicer-core``,
headless in CI (volumes and segmentations go through ``slicer_bridge``, the parameter node through
``slicer_parameters``; this module itself only checks that nodes are still in the scene)::

    logic = SegmentationLogic()                       # inside Slicer: the application's scene
    outcome = logic.segment(volume=getNode("CT"), prompts=["liver", "spleen"],
                            model="freqmedclip-tiny", device="auto", saliency=True, wait=True)
    outcome.segmentation_node, outcome.saliency_nodes["liver"]["combined"]
    logic.export_dicom_seg(outcome, path="ct_seg.dcm")  # input loaded with the DICOM module: SEG references it

    job = logic.segment(volume=ct, prompts=["liver"], wait=False)   # the GUI's way
    while not job.finished:
        logic.poll()                                  # on the main thread: progress, then the results
    job.cancel()                                      # between slices; the scene stays unchanged

    report = logic.segment_dicom_study(dicom_dir="study/", prompts=["liver"], output_dir="out/")

Threads: torch runs on one persistent worker thread (warm kernels and caches across runs); MRML,
Qt and pip stay on the main thread. Jobs report through a thread-safe queue that the main thread
drains with ``poll()``; only ``poll()`` (or a ``wait=True`` call, on the caller's thread) changes
the scene, after a run has succeeded. The input volume is copied before the worker sees it and
is never written. The worker and its jobs are in ``slicer_jobs``; GPU probing and requirement
checks for the Setup section in ``slicer_setup``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .errors import Cancelled, InputError, OutputExistsError
from .progress import CancelToken, ProgressCallback
from .slicer_jobs import CANCELLED, DONE, FAILED, RUNNING, Job, JobEvent, Worker, EitherToken
from .slicer_parameters import (
    DEFAULT_MODEL,
    find_parameter_node,
    parse_aux_prompts,
    parse_prompts,
    read_parameters,
    write_parameters,
)

log = logging.getLogger(__name__)


# outcomes --------------------------------------------------------------------------------------
@dataclass
class SegmentOutcome:
    """What a segmentation added to the scene."""

    input_node: Any
    segmentation_node: Any
    run: Any  # the engine's SegmentationRun; None for maps read back from the scene (outcome_in_scene)
    saliency_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompt -> layer -> volume node
    model_name: str = ""  # the preset (or model class) that ran: DICOM SEG records it as the algorithm

    @property
    def warnings(self) -> list[str]:
        return list(self.run.warnings) if self.run is not None else []


# the logic -------------------------------------------------------------------------------------
class SegmentationLogic:
    """Keyword-only API for the console, scripts and the widget (see the module docstring).

    ``context`` is a ``slicer_bridge.SlicerContext`` (default: the running Slicer's, looked up on
    first use); ``model_loader`` replaces ``weights.load_model`` (tests).
    """

    def __init__(self, *, context: Any = None, model_loader: Optional[Callable[..., Any]] = None) -> None:
        self._context = context
        self._model_loader = model_loader
        self._events: "queue.SimpleQueue[tuple[Job, str, Any]]" = queue.SimpleQueue()
        self.worker = Worker(self._events)
        self._ids = itertools.count(1)
        self._jobs: list[Job] = []
        self._models: dict[tuple, Any] = {}
        self._models_lock = threading.Lock()
        self.dicom_indexer: Optional[Callable[[Sequence[Path]], None]] = None  # set inside Slicer (DICOMUtils)

    @property
    def context(self) -> Any:
        if self._context is None:
            from .slicer_bridge import slicer_context

            self._context = slicer_context()
        return self._context

    # parameters ------------------------------------------------------------------------------
    def parameter_node(self, *, create: bool = True) -> Any:
        return find_parameter_node(self.context.scene, create=create)

    def parameters(self) -> dict[str, Any]:
        return read_parameters(self.parameter_node())

    def set_parameters(self, **values: Any) -> None:
        write_parameters(self.parameter_node(), values)

    # segmentation ----------------------------------------------------------------------------
    def segment(
        self,
        *,
        volume: Any,
        prompts: Union[str, Sequence[str]],
        model: Any = DEFAULT_MODEL,
        weights: Optional[str] = None,
        aux_prompts: Union[str, Sequence[Optional[str]], None] = None,
        device: str = "auto",
        batch_size: Union[int, str] = "auto",
        threshold: float = 0.5,
        min_component_ml: float = 0.0,
        saliency: bool = False,
        saliency_stage: int = 1,
        saliency_layers: Union[str, Sequence[str], None] = None,
        saliency_grid: str = "compact",
        segmentation_node: Any = None,
        colormap: str = "Inferno",
        wait: bool = True,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Union[SegmentOutcome, Job]:
        """Segment ``volume`` (a scalar volume node) with one segment per prompt.

        ``wait=True`` computes and applies on the caller's thread and returns a ``SegmentOutcome``;
        ``wait=False`` returns a ``Job`` whose ``result`` is that outcome once ``poll()`` finished it:
        ``cancel`` then cancels it as ``job.cancel()`` does, and ``progress`` is called by ``poll()``
        on the main thread, never from the worker (so it may update Qt widgets and MRML).
        ``model`` is a preset name or a model object; ``segmentation_node`` is reused (prompts
        already in it are replaced) or, if None, a new node is added. ``min_component_ml`` drops
        3D islands smaller than that many mL from each mask, as the Segment Editor's Islands effect
        would (``docs/results.md`` measures what it does to the shipped models). ``saliency_grid``
        "compact" (the default) keeps the heatmaps at most 128 voxels a side in-plane over the input's
        extent: 16× less memory on a 512 × 512 CT, and Slicer interpolates them on display; "source"
        puts them on the input's voxel grid.
        """
        from .slicer_bridge import check_colormap, volume_from_node

        self._check_nodes(volume, segmentation_node)
        prompt_list = parse_prompts(prompts)
        aux = parse_aux_prompts(aux_prompts, count=len(prompt_list), prompts=prompts)
        if saliency:
            check_colormap(colormap, context=self.context)  # now, not once the run is over
        source = volume_from_node(volume)  # a copy, taken on this (main) thread: the worker never sees the node

        def compute(report: ProgressCallback, token: Optional[CancelToken]) -> Any:
            from .engine import segment

            loaded, run_device, notes = self._model(model, weights=weights, device=device, progress=report)
            sink = None
            if saliency:
                from .saliency import build_saliency_sink

                sink = build_saliency_sink(model=loaded, layers=saliency_layers, stage=saliency_stage,
                                           grid=saliency_grid, threshold=threshold)  # explain the masks made here
            run = segment(source, prompt_list, model=loaded, aux_prompts=aux, device=run_device, batch_size=batch_size,
                          threshold=threshold, min_component_ml=min_component_ml, progress=report, cancel=token,
                          features_sink=sink)
            run.warnings[:0] = notes
            return run

        def apply(run: Any) -> SegmentOutcome:
            outcome = self._add_results(run, input_node=volume, segmentation_node=segmentation_node, colormap=colormap,
                                        source=source)
            outcome.model_name = run.model_name  # the preset (engine.model_label), whether named or passed loaded
            return outcome

        if wait:
            return apply(compute(progress or _ignore, cancel))
        return self.submit(f"Segmenting {volume.GetName()}", compute, apply, progress=progress, cancel=cancel)

    def _check_nodes(self, volume: Any, segmentation_node: Any) -> None:
        """Refuse nodes a run cannot use before it starts (a wrong one would fail only once it is over)."""
        from .slicer_bridge import check_output_segmentation

        if volume is None:
            raise InputError("no input volume selected: choose the CT volume to segment")
        if not callable(getattr(volume, "IsA", None)):  # e.g. an engine Volume read from a file
            raise InputError(f"volume must be a volume node of the scene (e.g. getNode('CT')), not a {type(volume).__name__}")
        if not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"{volume.GetName()!r} is a {volume.GetClassName()}, not a volume: choose the CT volume to segment")
        if volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{volume.GetName()!r} is a label map, not an image: choose the CT volume to segment")
        scene = self.context.scene
        for node, what in ((volume, "volume"), (segmentation_node, "segmentation")):
            if node is not None and scene.GetNodeByID(node.GetID() or "") is not node:
                raise InputError(f"the {what} {node.GetName() or node.GetClassName()!r} is not in the scene; "
                                 "add it (scene.AddNode) first")
        if segmentation_node is not None:
            check_output_segmentation(segmentation_node)

    def _add_results(self, run: Any, *, input_node: Any, segmentation_node: Any, colormap: str,
                     source: Any = None) -> SegmentOutcome:
        """Main thread only: the one place a run changes the scene. ``source`` is the copy of the input
        the run segmented: an input changed since (a filter writing into it, its spacing edited) gets nothing."""
        from .slicer_bridge import (
            add_saliency_volumes, add_segmentation, check_colormap, node_holds, remove_saliency_volumes,
        )

        context = self.context
        if context.scene.GetNodeByID(input_node.GetID()) is not input_node:
            raise InputError(f"the volume {input_node.GetName()!r} was removed while it was being segmented; nothing was added")
        if source is not None and not node_holds(input_node, source):
            raise InputError(f"the volume {input_node.GetName()!r} was changed (its voxels or geometry) while it was being "
                             "segmented, so the masks would not fit it; nothing was added: run the segmentation again")
        if segmentation_node is not None and context.scene.GetNodeByID(segmentation_node.GetID()) is not segmentation_node:
            run.warnings.append(f"the output segmentation {segmentation_node.GetName()!r} was removed while the run went on; "
                                "the masks went into a new segmentation")  # logged below with the others, and shown
            segmentation_node = None
        if run.features is not None:
            check_colormap(colormap, context=context)  # an unknown colour map fails before anything is added
        node = add_segmentation(run.results, reference_node=input_node, context=context, segmentation_node=segmentation_node)
        saliency_nodes = {}
        explained = {item.prompt: item for item in run.features.prompts} if run.features is not None else {}
        for result in run.results:
            if result.prompt in explained:
                saliency_nodes[result.prompt] = add_saliency_volumes(
                    explained[result.prompt], reference_node=input_node, context=context, colormap=colormap,
                    drop_other_layers=True)
            elif remove_saliency_volumes(reference_node=input_node, prompt=result.prompt, context=context):
                # an earlier run's maps explain the mask this one replaced: they would look current
                run.warnings.append(f"removed the saliency maps of {result.prompt!r} from an earlier run: they "
                                    "explained the mask this run replaced (run with saliency on to get new ones)")
        for warning in run.warnings:
            log.warning("%s", warning)
        return SegmentOutcome(input_node=input_node, segmentation_node=node, run=run, saliency_nodes=saliency_nodes)

    def show_saliency(self, outcome: SegmentOutcome, *, prompt: Optional[str] = None, layer: Optional[str] = None,
                      opacity: float = 0.5) -> Any:
        """Show one saliency layer (default: the combined map) of ``prompt`` over the input in every slice view."""
        from .slicer_bridge import show_overlay

        if not outcome.saliency_nodes:
            raise InputError("this run computed no saliency maps; run it again with saliency on")
        prompt = prompt if prompt is not None else next(iter(outcome.saliency_nodes))
        layers = outcome.saliency_nodes.get(prompt)
        if layers is None:
            raise InputError(f"no saliency maps for {prompt!r}; there are maps for {list(outcome.saliency_nodes)}")
        layer = layer or ("combined" if "combined" in layers else next(iter(layers)))
        if layer not in layers:
            raise InputError(f"no saliency layer {layer!r}; this run has {list(layers)}")
        scene = self.context.scene
        for node, what in ((outcome.input_node, "the input volume"), (layers[layer], "the saliency volume")):
            if scene.GetNodeByID(node.GetID() or "") is not node:  # a removed node would silently blank the views
                raise InputError(f"{what} {node.GetName()!r} was removed from the scene; "
                                 "run the segmentation again with saliency on")
        show_overlay(outcome.input_node, layers[layer], context=self.context, opacity=opacity)
        return layers[layer]

    def outcome_in_scene(self, input_node: Any) -> Optional[SegmentOutcome]:
        """The saliency maps earlier runs left over ``input_node`` in the scene (a saved scene opened again), as
        an outcome ``show_saliency`` shows; None when there are none.

        Its ``run`` is None: the masks are in the segmentation node, but a scene does not keep the run's
        arrays, so it cannot be exported as DICOM SEG.
        """
        from .slicer_bridge import saliency_volumes

        if input_node is None:
            return None
        maps = saliency_volumes(input_node, context=self.context)
        return SegmentOutcome(input_node=input_node, segmentation_node=None, run=None, saliency_nodes=maps) if maps else None

    def export_dicom_seg(self, outcome: SegmentOutcome, *, path: Union[str, Path], overwrite: bool = False,
                         file_for_instance: Union[Callable[[str], Any], Mapping[str, Any], None] = None,
                         wait: bool = True) -> Union[Path, Job]:
        """Write ``outcome``'s masks as one DICOM SEG that references the DICOM images its input was loaded from.

        A SEG frame must point at the very file its slice came from, so the source series is re-read
        with the engine's DICOM reader (files found through ``DICOM.instanceUIDs`` and
        ``file_for_instance``, default: Slicer's DICOM database). The masks, on the input node's grid,
        are moved onto that series' grid, the same voxels possibly in another axis order or direction,
        without interpolation; a node whose voxels are not the series' own (resampled, cropped) is
        refused. It writes the masks the run computed, not later edits made in the Segment Editor.
        Refuses to overwrite an existing file unless ``overwrite=True``, and never a source image.
        ``wait=False`` (the GUI) checks and finds the files here, then reads the series and writes the SEG
        on the worker (seconds to minutes for a large CT: Slicer must not freeze) and returns a ``Job``
        whose ``result`` is the path; a job cancelled before writing writes nothing.
        """
        import dataclasses
        import os

        from .dicom_seg import run_parameters, write_dicom_seg
        from .io.dicom_series import series_from_files
        from .io.dicom_volume import read_series
        from .slicer_bridge import dicom_source_files
        from .volume import reorient_to

        results = list(getattr(getattr(outcome, "run", None), "results", None) or [])
        if not results and getattr(outcome, "run", None) is None and getattr(outcome, "saliency_nodes", None):
            raise InputError("these maps were read back from the scene, without the run's masks; segment the volume "
                             "again to export a DICOM SEG (or save the segmentation node as it is)")
        if not results:
            raise InputError("nothing to export: segment a volume first")
        path = Path(path)
        node = outcome.input_node
        files = dicom_source_files(node, file_for_instance=file_for_instance)
        # before reading the whole series (write_dicom_seg checks again); a folder or a source image is
        # refused as such: telling the user to pass overwrite=True would not help there
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name for the DICOM SEG")
        if any(path.resolve() == f.resolve() or (path.exists() and os.path.samefile(path, f)) for f in files):
            raise OutputExistsError(f"{path}: is a source image of volume {node.GetName()!r}; TextSegment never "
                                    "overwrites its inputs, choose another output path")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path}: exists already; pass overwrite=True to replace it")
        node_name = node.GetName()  # read here: the worker never touches the node
        model_name = outcome.model_name or "TextSegment"
        parameters = run_parameters(outcome.run)

        def compute(report: ProgressCallback, token: Optional[CancelToken]) -> Path:
            name = f"Slicer volume {node_name!r}"
            source = read_series(series_from_files(files, source=name), source=name)
            try:
                moved = [dataclasses.replace(r, mask=reorient_to(r.mask, source)) for r in results]
            except InputError as exc:  # reorient_to would name the node twice: both volumes carry its name
                raise InputError(
                    f"volume {node_name!r} as segmented (shape {results[0].mask.shape}) does not lie on the voxel grid "
                    f"of the DICOM series it was loaded from (shape {source.shape}, {len(set(files))} file(s)); it was "
                    "cropped, resampled or moved (e.g. a hardened transform) after loading, so no SEG frame could "
                    "reference its source image. Segment the volume as loaded from DICOM to export a DICOM SEG"
                ) from exc
            if token is not None and token.cancelled:
                raise Cancelled(f"DICOM SEG export to {path}: cancelled; nothing was written")
            return write_dicom_seg(moved, source=source, path=path, overwrite=overwrite, model_name=model_name,
                                   series_description=" ".join(dict.fromkeys(["TextSegment", model_name])),
                                   parameters=parameters)

        if wait:
            return compute(_ignore, None)
        return self.submit(f"Exporting DICOM SEG to {path.name}", compute, writes_files=True)

    # whole-study batch -----------------------------------------------------------------------
    def segment_dicom_study(
        self,
        *,
        dicom_dir: Union[str, Path],
        prompts: Union[str, Sequence[str]],
        output_dir: Union[str, Path],
        dicom_seg: bool = True,
        model: Any = DEFAULT_MODEL,
        weights: Optional[str] = None,
        aux_prompts: Union[str, Sequence[Optional[str]], None] = None,
        device: str = "auto",
        batch_size: Union[int, str] = "auto",
        threshold: float = 0.5,
        saliency: bool = False,
        saliency_stage: int = 1,
        overwrite: bool = False,
        add_to_dicom_database: bool = False,
        wait: bool = True,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Any:
        """Every CT series of a DICOM study: one folder per series with NIfTI, DICOM SEG and saliency maps.

        Returns the ``study_batch.StudyReport`` (or a ``Job`` with ``wait=False``, which ``cancel``
        cancels too and whose ``progress`` is called by ``poll()`` on the main thread, never from the
        worker); a bad series is reported and skipped. The engine's DICOM reader is used everywhere
        because a DICOM SEG frame must reference the very file its slice was read from.
        ``add_to_dicom_database`` (inside Slicer) then indexes the study and the written SEGs with
        DICOMUtils, on the main thread.
        """
        from .study_batch import segment_study

        prompt_list = parse_prompts(prompts)
        aux = parse_aux_prompts(aux_prompts, count=len(prompt_list), prompts=prompts)
        if not Path(dicom_dir).exists():
            raise InputError(f"{dicom_dir}: no such folder or DICOMDIR")
        if add_to_dicom_database and self.dicom_indexer is None:
            raise InputError("add_to_dicom_database needs Slicer's DICOM database; run inside Slicer")

        def compute(report: ProgressCallback, token: Optional[CancelToken]) -> Any:
            loaded, run_device, notes = self._model(model, weights=weights, device=device)
            for note in notes:
                report(0.0, note)
            return segment_study(
                dicom_dir, prompt_list, output_dir=output_dir, model=loaded, weights=weights, aux_prompts=aux,
                model_name=model if isinstance(model, str) else None,
                device=run_device, batch_size=batch_size, threshold=threshold, dicom_seg=dicom_seg,
                saliency=saliency, saliency_stage=saliency_stage, overwrite=overwrite, progress=report, cancel=token,
            )

        def apply(report: Any) -> Any:
            if add_to_dicom_database:
                self.dicom_indexer([Path(dicom_dir), Path(output_dir)])
            return report

        if wait:
            return apply(compute(progress or _ignore, cancel))
        return self.submit(f"Segmenting the study in {dicom_dir}", compute, apply, progress=progress, cancel=cancel,
                           writes_files=True)

    # weights ---------------------------------------------------------------------------------
    def weights_choices(self, model_name: str) -> list[tuple[str, str]]:
        """(id, label) of the weights known for ``model_name``, with where they are and their licence."""
        from .weights import list_weights

        choices = [("", "default weights")]
        for status in list_weights():
            entry = status.entry
            if entry.kind == "checkpoint" and entry.model == model_name:
                choices.append((entry.id, f"{entry.id} ({status.status}; licence: {entry.licence})"))
        return choices

    def import_weights(self, path: Union[str, Path], *, wait: bool = True) -> Any:
        """Copy a checkpoint file into the cache, checksummed (``weights.import_weights``)."""
        from .weights import import_weights

        return self._run_or_submit(f"Importing {Path(path).name}", lambda report, token: import_weights(path), wait=wait)

    def download_weights(self, weights_id: str, *, model_name: str, wait: bool = True) -> Any:
        """Download known weights into the cache; the sha256 is checked before the file is kept."""
        from .weights import resolve_weights

        def compute(report: ProgressCallback, token: Optional[CancelToken]) -> Any:
            return resolve_weights(weights_id, model_name=model_name, progress=report, cancel=token)

        return self._run_or_submit(f"Downloading {weights_id}", compute, wait=wait)

    def robustness_note(self, *, prompt: Optional[str] = None, model: Any = None) -> str:
        """What is known about how much the masks move when ``prompt`` is reworded (last model used by default)."""
        return robustness_note(model if model is not None else self._last_model(), prompt=prompt)

    # job control -----------------------------------------------------------------------------
    def submit(self, title: str, compute: Callable[[ProgressCallback, CancelToken], Any],
               apply: Optional[Callable[[Any], Any]] = None, *, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None, writes_files: bool = False) -> Job:
        """Queue ``compute`` on the worker; ``poll()`` later runs ``apply`` on its result on the main thread.

        ``cancel`` (the caller's token) cancels the job as ``job.cancel()`` does; ``progress`` is
        called by ``poll()``, on the main thread, never from the worker (it may touch Qt and MRML).
        A cancel that comes after ``compute`` returned skips ``apply`` (nothing changed in the scene),
        unless ``writes_files``: then the files are written and the job is done.
        """
        job = Job(id=next(self._ids), title=title, compute=compute, apply=apply, cancel_token=EitherToken(cancel),
                  progress=progress, writes_files=writes_files)
        self._jobs.append(job)
        self.worker.submit(job)
        return job

    def poll(self) -> list[JobEvent]:
        """Main thread: take the worker's news, finish computed jobs (scene changes happen here)."""
        seen = []
        while True:
            try:
                job, kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            seen.append(JobEvent(job, self._handle(job, kind, payload)))
        self._jobs = [job for job in self._jobs if not job.finished]
        return seen

    def _handle(self, job: Job, kind: str, payload: Any) -> str:
        if kind == "progress":
            job.fraction, job.message = payload
            if job.progress is not None:
                job.progress(job.fraction, job.message)
            return kind
        if kind == RUNNING:
            job.state, job.message = RUNNING, f"{job.title}…"
            return kind
        if kind == CANCELLED or (kind == "computed" and job.cancel_token.cancelled and not job.writes_files):
            job.state, job.message = CANCELLED, "cancelled; nothing was changed"
            return CANCELLED
        if kind == FAILED:
            job.state, job.error, job.message = FAILED, payload, str(payload)
            return FAILED
        try:
            job.result = job.apply(payload) if job.apply is not None else payload
        except Exception as exc:  # noqa: BLE001 - shown to the user like any failure
            job.state, job.error, job.message = FAILED, exc, str(exc)
            return FAILED
        job.state, job.fraction, job.message = DONE, 1.0, "done"
        return DONE

    def wait(self, job: Job, *, timeout: Optional[float] = None, interval: float = 0.02) -> Any:
        """Poll until ``job`` finishes (scripts and tests); returns its result, raises its error or ``Cancelled``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            self.poll()
            if job.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job.title} did not finish within {timeout} s")
            time.sleep(interval)
        if job.state == CANCELLED:
            raise Cancelled(f"{job.title}: cancelled; nothing was changed")
        if job.error is not None:
            raise job.error
        return job.result

    @property
    def running(self) -> list[Job]:
        return [job for job in self._jobs if not job.finished]

    def cancel(self, job: Optional[Job] = None) -> None:
        """Cancel ``job``, or every job not finished yet."""
        for item in [job] if job is not None else self.running:
            item.cancel()

    def shutdown(self) -> None:
        """Cancel everything and stop the worker (module cleanup)."""
        self.cancel()
        self.worker.shutdown(timeout=5.0)

    def _run_or_submit(self, title: str, compute: Callable[..., Any], *, wait: bool) -> Any:
        return compute(_ignore, None) if wait else self.submit(title, compute, writes_files=True)

    # models ----------------------------------------------------------------------------------
    def _model(self, model: Any, *, weights: Optional[str], device: str,
               progress: Optional[ProgressCallback] = None) -> tuple[Any, str, list[str]]:
        """(model, device to run on, notes): loaded once and kept (one model at a time: GPU memory)."""
        if not isinstance(model, str):
            return model, device, []
        file_state = _file_state(weights)
        key = (model, weights or "", device, file_state)
        with self._models_lock:
            cached = self._models.get(key)
        if cached is not None:
            loaded, run_device = cached
            notes = [f"{model} did not fit in GPU memory: running on the CPU (slower)"] if run_device != device else []
            return loaded, run_device, notes
        if progress is not None:
            progress(0.0, f"loading {model}")
        loader = self._model_loader
        if loader is None:
            from .weights import load_model as loader
        notes: list[str] = []
        run_device = device
        try:
            loaded = loader(model, weights=weights or None, device=device)
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError" or device == "cpu":
                raise
            notes.append(f"not enough GPU memory to load {model}: running on the CPU (slower)")
            log.warning("%s", notes[-1])
            run_device = "cpu"
            loaded = loader(model, weights=weights or None, device=run_device)
        with self._models_lock:  # one model at a time, under the device asked for and the one it runs on
            self._models = {key: (loaded, run_device), (model, weights or "", run_device, file_state): (loaded, run_device)}
        return loaded, run_device, notes

    def _last_model(self) -> Any:
        with self._models_lock:
            return next((loaded for loaded, _ in self._models.values()), None)


def _ignore(fraction: float, message: str = "") -> None:
    return None


def _file_state(weights: Optional[str]) -> Optional[tuple[int, int]]:
    """(mtime, size) when ``weights`` names a file: a checkpoint rewritten in place (a user's own
    training run exporting again) is loaded again instead of the model kept from the old file."""
    if not weights:
        return None
    try:
        stat = Path(weights).expanduser().stat()
    except (OSError, ValueError):
        return None  # an id, "random", a hub id: immutable once resolved
    return stat.st_mtime_ns, stat.st_size


def output_fits_input(segmentation_node: Any, *, input_node: Any) -> bool:
    """Whether a run on ``input_node`` may keep ``segmentation_node`` as its output when the user picks that input.

    Only a segmentation on that volume's geometry: one made for another volume (or for one since removed,
    which leaves no reference) would get its segments replaced by another image's masks."""
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    return bool(input_node.GetID()) and segmentation_node.GetNodeReferenceID(role) == input_node.GetID()


# robustness ------------------------------------------------------------------------------------
def robustness_note(model: Any, *, prompt: Optional[str] = None) -> str:
    """Prompt-robustness figures the weights carry, for ``prompt`` if they have its own, or what to try instead.

    Read from the checkpoint metadata: ``metrics`` may hold ``pss``, ``prompt_swap_dice`` and
    ``false_positive_rate``, and ``metrics["prompts"][prompt]`` the same figures for one prompt.
    """
    source = getattr(model, "weights_source", None)
    info = getattr(source, "info", None)
    metrics = (getattr(info, "metadata", None) or {}).get("metrics") or {}
    own = (metrics.get("prompts") or {}).get(prompt) if prompt else None
    figures, scope = (own, f"for {prompt!r}") if own else (metrics, "of these weights")
    parts = []
    if figures.get("pss") is not None:
        parts.append(f"Prompt Sensitivity Score {float(figures['pss']):.2f} (0 = rewording to L3 prompts costs no Dice)")
    if figures.get("prompt_swap_dice") is not None:
        parts.append(f"mean Dice between masks of swapped synonymous prompts {float(figures['prompt_swap_dice']):.2f}")
    if figures.get("false_positive_rate") is not None:
        parts.append(f"false positives on absent structures {float(figures['false_positive_rate']):.0%}")
    if parts:
        return f"Robustness {scope}: " + "; ".join(parts) + "."
    return ("No prompt-robustness figures ship with these weights. Reword the prompt (e.g. 'liver' and "
            "'the liver parenchyma') and compare: a mask that changes a lot is not robust.")
