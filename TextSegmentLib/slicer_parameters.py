"""The module's parameter node and prompt parsing, without Qt or torch.

One list of ``PARAMETERS`` that both ``SegmentationLogic`` (plain MRML, headless) and the
``parameterNodeWrapper`` in ``TextSegment.py`` are built from, so the two read and write the same
scene files; and the prompt-box parsing the logic and the widget share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import InputError

log = logging.getLogger(__name__)

MODULE_NAME = "TextSegment"
DEFAULT_MODEL = "freqmedclip-tiny"
# The presets the registry builds, listed without importing torch (Slicer start-up; torch may be missing).
MODEL_PRESETS = ("freqmedclip-tiny", "freqmedclip-base", "tgcnet-tiny", "tgcnet-base")
COLORMAPS = ("Inferno", "Viridis", "Magma", "Plasma", "ColdToHotRainbow")


# parameters ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parameter:
    """One entry of the module's parameter node.

    ``type`` is str, int, float or bool, or the MRML class name of a referenced node. Values are
    stored exactly as Slicer's ``parameterNodeWrapper`` stores them (``str(number)``, "True"/"False",
    node references under the parameter's name), so this plain-MRML helper and the wrapper in
    ``TextSegment.py`` read and write the same scene files.
    """

    name: str
    type: Any
    default: Any = None
    choices: tuple = ()
    bounds: Optional[tuple[float, float]] = None

    @property
    def is_node(self) -> bool:
        return isinstance(self.type, str)


PARAMETERS = (
    Parameter("inputVolume", "vtkMRMLScalarVolumeNode"),
    Parameter("prompts", str, ""),
    Parameter("auxPrompts", str, ""),
    Parameter("model", str, DEFAULT_MODEL),
    Parameter("weights", str, ""),  # "" = the model's default weights
    Parameter("device", str, "auto", choices=("auto", "cuda", "cpu")),
    Parameter("threshold", float, 0.5, bounds=(0.05, 0.95)),
    Parameter("minIslandMl", float, 0.0, bounds=(0.0, 1000.0)),  # 0 = keep every island
    Parameter("outputSegmentation", "vtkMRMLSegmentationNode"),
    Parameter("saliency", bool, False),
    Parameter("saliencyStage", int, 1, bounds=(1, 3)),
    Parameter("compactSaliency", bool, True),  # maps on the compact grid (grid.py)
    Parameter("saliencyLayer", str, ""),  # "" = the combined map
    Parameter("saliencyOpacity", float, 0.5, bounds=(0.0, 1.0)),
    Parameter("colormap", str, "Inferno", choices=COLORMAPS),
    Parameter("combinedMap", bool, True),
)
_BY_NAME = {p.name: p for p in PARAMETERS}


def find_parameter_node(scene: Any, *, create: bool = True) -> Any:
    """The module's ``vtkMRMLScriptedModuleNode``, found and made as ``ScriptedLoadableModuleLogic`` does.

    A singleton tagged with the module name and carrying its ``ModuleName`` attribute, so a scene
    saved headless opens in Slicer with the same parameters, and the other way round.
    """
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            candidate = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
            if candidate.GetAttribute("ModuleName") == MODULE_NAME:
                node = candidate
                break
    if node is not None or not create:
        return node
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # the Python variable owns it now (as in Slicer's createParameterNode)
    node.SetSingletonTag(MODULE_NAME)
    node.SetAttribute("ModuleName", MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    node = scene.AddNode(node)
    write_parameters(node, {})
    return node


def read_parameters(node: Any) -> dict[str, Any]:
    """Every parameter's value (its default where the node has none).

    A value the module cannot use (a scene edited by hand or by another version: threshold "abc",
    stage 7) is read as its default with a warning: a loaded scene must not break the module.
    """
    values = {}
    for p in PARAMETERS:
        if p.is_node:
            values[p.name] = node.GetNodeReference(p.name)
        elif not node.HasParameter(p.name):
            values[p.name] = p.default
        elif p.type is bool:
            values[p.name] = node.GetParameter(p.name) == "True"
        else:
            text = node.GetParameter(p.name)
            try:
                values[p.name] = p.type(text)
                _check(p, values[p.name])
            except (ValueError, InputError) as exc:
                log.warning("TextSegment parameter %r holds %r, which the module cannot use (%s); using %r",
                            p.name, text, exc, p.default)
                values[p.name] = p.default
    return values


def write_parameters(node: Any, values: Mapping[str, Any]) -> None:
    """Write ``values`` (validated) and the defaults of parameters the node lacks, in one modification."""
    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise InputError(f"unknown TextSegment parameter(s) {unknown}; known: {sorted(_BY_NAME)}")
    for name, value in values.items():
        _check(_BY_NAME[name], value)
    modifying = node.StartModify()
    try:
        for p in PARAMETERS:
            if p.name in values:
                _store(node, p, values[p.name])
            elif not node.HasParameter(p.name):
                _store(node, p, p.default)
    finally:
        node.EndModify(modifying)


def _check(p: Parameter, value: Any) -> None:
    if p.is_node:
        if value is not None and not value.IsA(p.type):
            raise InputError(f"parameter {p.name!r} takes a {p.type}, not a {value.GetClassName()}")
        return
    if p.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, p.type) or (p.type is int and isinstance(value, bool)):
        raise InputError(f"parameter {p.name!r} takes a {p.type.__name__}, got {value!r}")
    if p.choices and value not in p.choices:
        raise InputError(f"parameter {p.name!r} must be one of {list(p.choices)}, got {value!r}")
    if p.bounds and not p.bounds[0] <= value <= p.bounds[1]:
        raise InputError(f"parameter {p.name!r} must lie between {p.bounds[0]} and {p.bounds[1]}, got {value!r}")


def _store(node: Any, p: Parameter, value: Any) -> None:
    if p.is_node:  # as the wrapper's NodeSerializer: an empty parameter marks it present, the reference holds it
        node.SetParameter(p.name, "")
        node.SetNodeReferenceID(p.name, value.GetID() if value is not None else None)
    elif p.type is bool:
        node.SetParameter(p.name, "True" if value else "False")
    else:
        node.SetParameter(p.name, str(p.type(value)))


# prompts ---------------------------------------------------------------------------------------
def parse_prompts(text: Union[str, Sequence[str]]) -> list[str]:
    """One prompt per line (or a list); blank lines and repeats dropped, order kept.

    A repeat differing only in case ("Liver", "liver") is dropped too: Slicer finds segments by
    name regardless of case, so both would land in one segment, the second overwriting the first.
    """
    lines = text.splitlines() if isinstance(text, str) else list(text)
    if isinstance(text, (bytes, bytearray)) or not all(isinstance(line, str) for line in lines):
        # bytes would become one prompt per byte value ("98", "111", ...), None a segment named "None"
        raise InputError(f"prompts must be text: one string with a prompt per line, or a list of strings, not {text!r}")
    prompts = [" ".join(lines[i].split()) for i in _kept_lines(lines)]
    if not prompts:
        raise InputError("no prompt given: type what to segment, one per line (e.g. 'liver')")
    return prompts


def _kept_lines(lines: Sequence[str]) -> list[int]:
    """Indices of the lines ``parse_prompts`` keeps: not blank, not a repeat (case and spacing aside)."""
    seen: set[str] = set()
    kept = []
    for i, line in enumerate(lines):
        key = " ".join(str(line).split()).casefold()
        if key and key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


def parse_aux_prompts(text: Union[str, Sequence[str], None], *, count: int,
                      prompts: Union[str, Sequence[str], None] = None) -> Optional[list[Optional[str]]]:
    """Auxiliary descriptions (TGC-Net), one line per prompt, or none at all.

    Given the ``prompts`` as typed, descriptions written line for line beside them (blank and repeated
    prompt lines included) are paired by line: the prompts' blank lines are dropped, so the
    descriptions' count no longer matched and the run was refused.
    """
    if text is None:
        return None
    lines = [" ".join(str(line).split()) for line in (text.splitlines() if isinstance(text, str) else text)]
    if not any(lines):
        return None
    typed = (prompts.splitlines() if isinstance(prompts, str) else list(prompts)) if prompts is not None else []
    if len(lines) != count and len(lines) == len(typed):
        lines = [lines[i] for i in _kept_lines(typed)]
    if len(lines) != count:
        raise InputError(f"{len(lines)} auxiliary description line(s) for {count} prompt(s): give one line per prompt, or none")
    return [line or None for line in lines]
