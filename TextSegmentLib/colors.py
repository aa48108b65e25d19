"""Colours and coded meanings for what we draw: the saliency colour map and per-prompt segment styles.

Pure numpy and strings, so the MRML bridge (segment colour and terminology), the DICOM SEG writer
(segmented property category/type) and the PNG renderers all agree on what "liver" looks like and
means, inside Slicer or not.

* ``inferno(n)`` is an ``(n, 3)`` float table in [0, 1]: matplotlib's Inferno (CC0) resampled from 33
  anchors, so no matplotlib is needed at run time (Slicer does not ship it).
* ``lookup(prompt)`` maps free text to a ``SegmentStyle``: a display colour close to Slicer's
  generic-anatomy colours and SNOMED-CT codes from DICOM CID 7150/7151/7159 (checked against
  pydicom's code dictionary in the tests). Unknown text gets Slicer's own default meaning
  (category and type "Tissue") and a stable colour derived from the text.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .prompts.names import ORGAN_ADJECTIVES

# matplotlib's "inferno" sampled at 33 evenly spaced points (0..255 RGB); linear interpolation
# between them stays within 5/255 of the original 256-entry table.
_INFERNO_ANCHORS = (
    (0, 0, 4), (4, 3, 18), (11, 7, 36), (21, 11, 55), (33, 12, 74), (47, 10, 91), (61, 9, 101),
    (74, 12, 107), (87, 16, 110), (100, 21, 110), (113, 25, 110), (125, 30, 109), (138, 34, 106),
    (151, 39, 102), (163, 44, 97), (176, 49, 91), (188, 55, 84), (199, 62, 76), (210, 70, 68),
    (219, 80, 59), (228, 90, 49), (235, 102, 40), (241, 115, 29), (246, 128, 19), (249, 142, 9),
    (251, 157, 7), (252, 172, 17), (251, 188, 33), (249, 203, 53), (245, 219, 76), (242, 234, 105),
    (243, 246, 138), (252, 255, 164),
)


def inferno(n: int = 256) -> np.ndarray:
    """An ``(n, 3)`` Inferno-like colour table, floats in [0, 1], dark (low) to bright (high)."""
    if n < 2:
        raise ValueError(f"a colour table needs at least 2 entries, got {n}")
    anchors = np.asarray(_INFERNO_ANCHORS, dtype=np.float64) / 255.0
    x = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1)


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item): value, coding scheme, human meaning."""

    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")


@dataclass(frozen=True)
class SegmentStyle:
    """How one prompt's segment is shown and coded."""

    label: str  # the prompt text: what the user asked for
    rgb: tuple[int, int, int]  # 0..255
    category: Code
    type: Code
    modifier: Optional[Code] = None  # laterality of ``type`` ("left kidney")
    region: Optional[Code] = None  # for findings: the organ named with them ("cyst in the liver")
    region_modifier: Optional[Code] = None  # laterality of ``region``
    known: bool = True  # False: nothing in the table matched, the fallback meaning is used

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Entry:
    code: Code
    rgb: tuple[int, int, int]
    synonyms: tuple[str, ...]
    category: Code = ANATOMICAL_STRUCTURE


def _anatomy(value: str, meaning: str, rgb: tuple[int, int, int], *synonyms: str) -> _Entry:
    return _Entry(Code(value, "SCT", meaning), rgb, (meaning.lower(),) + synonyms)


def _finding(value: str, meaning: str, rgb: tuple[int, int, int], *synonyms: str) -> _Entry:
    return _Entry(Code(value, "SCT", meaning), rgb, (meaning.lower(),) + synonyms, ABNORMAL)


# Common CT targets. Meanings are those of DICOM's code dictionary; colours follow Slicer's generic
# anatomy colours where we know them.
ANATOMY: tuple[_Entry, ...] = (
    _anatomy("10200004", "Liver", (221, 130, 101), "hepar"),
    _anatomy("78961009", "Spleen", (157, 108, 162)),
    _anatomy("64033007", "Kidney", (185, 102, 83), "kidneys"),
    _anatomy("15776009", "Pancreas", (249, 180, 111)),
    _anatomy("69695003", "Stomach", (216, 132, 105)),
    _anatomy("28231008", "Gallbladder", (139, 150, 98), "gall bladder"),
    _anatomy("15825003", "Aorta", (224, 97, 76)),
    _anatomy("64131007", "Inferior vena cava", (0, 151, 206), "ivc", "vena cava"),
    _anatomy("32764006", "Portal vein", (0, 151, 206), "portal venous system"),
    _anatomy("39607008", "Lung", (197, 165, 145), "lungs"),
    _anatomy("80891009", "Heart", (206, 110, 84), "myocardium"),
    _anatomy("89837001", "Bladder", (222, 154, 132), "urinary bladder"),
    _anatomy("32849002", "Esophagus", (211, 171, 143), "oesophagus"),
    _anatomy("71854001", "Colon", (204, 168, 143), "large intestine", "large bowel"),
    _anatomy("30315005", "Small intestine", (205, 167, 142), "small bowel"),
    _anatomy("38848004", "Duodenum", (255, 253, 229)),
    _anatomy("34402009", "Rectum", (200, 160, 140)),
    _anatomy("23451007", "Adrenal gland", (249, 186, 150), "adrenal", "adrenals", "suprarenal gland"),
    _anatomy("44567001", "Trachea", (182, 228, 255), "windpipe"),
    _anatomy("69748006", "Thyroid", (220, 160, 160), "thyroid gland"),
    _anatomy("41216001", "Prostate", (230, 158, 140), "prostate gland"),
    _anatomy("35039007", "Uterus", (205, 148, 170), "womb"),
    _anatomy("12738006", "Brain", (250, 250, 225), "cerebrum"),
    _anatomy("2748008", "Spinal cord", (244, 214, 49)),
    _anatomy("421060004", "Spine", (241, 213, 144), "vertebral column", "spinal column"),
    _anatomy("51282000", "Vertebra", (241, 213, 144), "vertebrae", "vertebral body"),
    _anatomy("113197003", "Rib", (241, 213, 144), "ribs"),
    _anatomy("56873002", "Sternum", (241, 213, 144)),
    _anatomy("54735007", "Sacrum", (241, 213, 144)),
    _anatomy("71341001", "Femur", (241, 213, 144), "femurs", "thigh bone"),
    _anatomy("85050009", "Humerus", (241, 213, 144)),
    _anatomy("89546000", "Skull", (241, 213, 144), "cranium"),
    _anatomy("272673000", "Bone", (241, 214, 145), "bones", "skeleton"),
    _anatomy("71616004", "Muscle", (192, 104, 88), "muscles"),
    _anatomy("55603005", "Fat", (230, 220, 70), "adipose tissue", "adipose", "subcutaneous fat"),
    _anatomy("59441001", "Lymph Node", (68, 172, 100), "lymph nodes"),
    _anatomy("955009", "Bronchus", (180, 220, 250), "bronchi", "airway", "airways"),
    _anatomy("51114001", "Artery", (216, 101, 79), "arteries"),
    _anatomy("29092000", "Vein", (0, 151, 206), "veins"),
)

# An organ's adjective names the organ a finding lies in ("pancreatic cancer" is the pancreas's, as
# "pancreas cancer" is), with the adjectives ``prompts`` reads; only for findings, and only when no organ
# noun is named: "hepatic vein" stays a vein, "tumour in the hepatic vein" the vein's.
_REGION_ADJECTIVES: tuple[_Entry, ...] = tuple(
    _Entry(e.code, e.rgb, adjectives, e.category)
    for e in ANATOMY
    if (adjectives := tuple(a for a, noun in ORGAN_ADJECTIVES.items() if noun in {e.code.meaning.lower(), *e.synonyms}))
)

FINDINGS: tuple[_Entry, ...] = (
    _finding("108369006", "Neoplasm", (255, 128, 0), "tumor", "tumors", "tumour", "tumours", "cancer",
             "carcinoma", "malignancy", "neoplasms"),
    _finding("128462008", "Metastasis", (255, 64, 64), "metastases", "metastatic lesion"),
    _finding("4147007", "Mass", (255, 160, 0), "masses"),
    _finding("27925004", "Nodule", (255, 210, 0), "nodules"),
    _finding("367643001", "Cyst", (120, 200, 255), "cysts", "cystic lesion"),
    _finding("52988006", "Lesion", (255, 96, 160), "lesions"),
    _finding("50960005", "Hemorrhage", (180, 0, 0), "haemorrhage", "bleeding", "hematoma", "haematoma"),
    _finding("60046008", "Pleural effusion", (100, 160, 255), "effusion"),
)

# bright, mutually distinct colours for prompts that match nothing, picked by a stable hash of the text
_FALLBACK_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)

# words after which the prompt says what to leave out ("left kidney excluding the cyst")
# (the words ``prompts`` splits exclusions on, so the coded meaning is that of the ground truth)
_EXCLUSION = re.compile(r"\b(excluding|except|without|not|minus|sparing|apart from|other than)\b")


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces: the form the tables are matched in."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _find(entries: tuple[_Entry, ...], text: str) -> Optional[_Entry]:
    """The entry mentioned first in ``text`` (the longest synonym wins at equal position)."""
    best: Optional[tuple[int, int, _Entry]] = None
    for entry in entries:
        for synonym in entry.synonyms:
            match = re.search(rf"\b{re.escape(synonym)}\b", text)
            if match and (best is None or (match.start(), -len(synonym)) < (best[0], best[1])):
                best = (match.start(), -len(synonym), entry)
    return best[2] if best else None


def _laterality(text: str) -> Optional[Code]:
    left = re.search(r"\b(left|l|lt)\b", text) is not None  # "L kidney", "kidney (lt)": as ``prompts`` reads them
    right = re.search(r"\b(right|r|rt)\b", text) is not None
    if left == right:  # neither, or both ("left and right kidney")
        return None
    return LEFT if left else RIGHT


def lookup(prompt: str) -> SegmentStyle:
    """Colour and coded meaning for a free-text prompt; never fails (unknown text gets a fallback)."""
    text = normalise(prompt)
    wanted = _EXCLUSION.split(text, maxsplit=1)[0]
    organ = _find(ANATOMY, wanted)
    finding = _find(FINDINGS, wanted)
    side = _laterality(wanted)
    if finding is not None:
        organ = organ or _find(_REGION_ADJECTIVES, wanted)
        return SegmentStyle(
            label=prompt, rgb=finding.rgb, category=finding.category, type=finding.code,
            region=organ.code if organ else None, region_modifier=side if organ else None,
        )
    if organ is not None:
        return SegmentStyle(label=prompt, rgb=organ.rgb, category=organ.category, type=organ.code, modifier=side)
    rgb = _FALLBACK_PALETTE[zlib.crc32(text.encode("utf-8")) % len(_FALLBACK_PALETTE)]
    return SegmentStyle(label=prompt, rgb=rgb, category=TISSUE, type=TISSUE, known=False)
