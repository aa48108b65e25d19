"""Prompt pyramids, targets as mask algebra, name normalisation and free-text resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from TextSegmentLib.colors import LEFT, RIGHT, lookup
from TextSegmentLib.errors import InputError
from TextSegmentLib.phantom import LABEL_IDS, LABELS, make_phantom
from TextSegmentLib.prompts import (
    Prompt,
    Target,
    build_prompt_pyramid,
    canonical_target_name,
    display_name,
    find_target_name,
    ground_truth,
    prompt_table,
    resolve_target,
)
from TextSegmentLib.prompts.names import vocabulary_conflicts
from TextSegmentLib.prompts.targets import descendants, expand
from TextSegmentLib.volume import Volume

M3D = "adapted from M3D term dictionary (MIT)"
TOTALSEG_TARGETS = (
    "liver", "spleen", "kidney_left", "kidney_right", "kidneys", "pancreas", "stomach", "aorta", "inferior_vena_cava",
    "gallbladder", "lung_left", "lung_right", "lungs", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "vertebrae", "heart", "colon",
    "urinary_bladder", "adrenal_gland_left", "adrenal_gland_right", "esophagus", "duodenum", "small_bowel",
    "portal_vein_and_splenic_vein",
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=11, shape=(24, 80, 80), lesions="all")


@pytest.fixture(scope="module")
def totalseg(shared_data):
    """TotalSegmentator's reference label map (stored RAS-flipped: direction diag(-1, -1, 1))."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data / "ct/totalseg_example_ct_sm/example_seg.nii.gz"))
    volume = Volume(sitk.GetArrayFromImage(image), spacing=image.GetSpacing(), origin=image.GetOrigin(),
                    direction=np.array(image.GetDirection()).reshape(3, 3))
    names = json.loads((shared_data / "ct/totalsegmentator_class_maps.json").read_text())["total"]
    return volume, names  # names keyed by strings, as JSON gives them


def every_label() -> set[str]:
    """Label names of real maps (phantom and TotalSegmentator): group names are not labels."""
    return set(LABELS.values()) | set(prompt_table().totalsegmentator_names)


def physical_centroid(volume: Volume, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    assert k.size
    return volume.physical_points(np.stack([i, j, k], axis=1)).mean(axis=0)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, canonical",
    [
        ("Left Kidney", "kidney_left"), ("kidney (left)", "kidney_left"), ("left-kidney", "kidney_left"),
        ("L kidney", "kidney_left"), ("kidney_left", "kidney_left"), ("RT KIDNEY", "kidney_right"),
        ("kidneys", "kidneys"), ("Kidney", "kidneys"), ("IVC", "inferior_vena_cava"), ("gall bladder", "gallbladder"),
        ("Liver Tumour", "liver_tumor"), ("hepatic lesion", "liver_tumor"), ("left lower lobe", "lung_lower_lobe_left"),
        ("RML", "lung_middle_lobe_right"), ("vertebra L1", "vertebrae_L1"), ("left iliac artery", "iliac_artery_left"),
        ("oesophagus", "esophagus"), ("small intestine", "small_bowel"), ("the spine", "vertebrae"),
        ("pulmonary nodule", "lung_nodule"), ("necrotic centre", "liver_tumor_necrotic_core"),
        ("I.V.C.", "inferior_vena_cava"), ("i.v.c", "inferior_vena_cava"), ("R.M.L.", "lung_middle_lobe_right"),
        ("L. kidney", "kidney_left"), ("Lt. kidney", "kidney_left"),
    ],
)
def test_canonical_target_name_normalises_typed_names(typed, canonical):
    assert canonical_target_name(typed) == canonical


@pytest.mark.parametrize(
    "adjective, noun, canonical",
    [
        ("hepatic lesion", "liver lesion", "liver_tumor"), ("renal cyst", "kidney cyst", "kidney_cyst"),
        ("pulmonary nodule", "lung nodule", "lung_nodule"), ("splenic lesion", "spleen lesion", "spleen_tumor"),
        ("gastric cancer", "stomach cancer", "stomach_tumor"), ("pancreatic cancer", "pancreas cancer", "pancreas_tumor"),
        ("Pancreatic Tumour", "pancreas tumor", "pancreas_tumor"), ("colonic carcinoma", "colon carcinoma", "colon_tumor"),
        ("duodenal mass", "duodenum mass", "duodenum_tumor"), ("prostatic carcinoma", "prostate carcinoma", "prostate_tumor"),
        ("cerebral tumour", "brain tumor", "brain_tumor"), ("esophageal cancer", "oesophagus cancer", "esophagus_tumor"),
    ],
)
def test_an_organs_adjective_and_noun_give_one_name(adjective, noun, canonical):
    # one canonical name per lesion (hepatic -> liver): "pancreatic cancer" was pancreatic_tumor beside pancreas_tumor
    assert canonical_target_name(adjective) == canonical_target_name(noun) == canonical
    organ = lookup(noun).region
    assert organ is not None and lookup(adjective).region == organ and lookup(adjective).type == lookup(noun).type


def test_an_organs_adjective_names_a_findings_region_only():
    # colours and codes: "pancreatic cancer" lies in the pancreas (was: no region); "hepatic vein" stays a vein
    assert lookup("hepatic vein").type.meaning == "Vein" and lookup("renal artery").type.meaning == "Artery"
    assert lookup("tumour in the hepatic vein").region.meaning == "Vein"
    style = lookup("left renal cyst")
    assert style.region.meaning == "Kidney" and style.region_modifier == LEFT


def test_dotted_abbreviations_resolve_like_their_letters():
    assert resolve_target("I.V.C.") == resolve_target("IVC") == resolve_target("inferior vena cava")
    assert resolve_target("liver excluding the I.V.C.") == Target(("liver",), ("inferior_vena_cava",))
    assert canonical_target_name("L.kidney") == "kidney_left"  # one letter then a word: a side, not an abbreviation


def test_unknown_names_come_back_normalised_and_are_not_found():
    assert canonical_target_name("Brain Tumour (Left)") == "brain_tumor_left"
    assert find_target_name("purple elephant") is None
    assert find_target_name("my organ", known=["my_organ"]) == "my_organ"


def test_every_table_name_and_alias_round_trips():
    assert vocabulary_conflicts() == []
    for name, entry in prompt_table().entries.items():
        for phrase in (name, *entry.names, *entry.aliases):
            assert canonical_target_name(phrase) == name, phrase
    assert display_name("vertebrae_L1") == "L1 vertebra" and canonical_target_name("L1 vertebra") == "vertebrae_L1"
    assert display_name("iliac_artery_left") == "left iliac artery"


# --- targets ----------------------------------------------------------------------------------------


def test_groups_expand_organs_with_their_lesions():
    names = set(LABELS.values())
    assert expand("liver", names) == {"liver", "liver_tumor_necrotic_core", "liver_tumor_enhancing_rim"}
    assert expand("kidneys", names) == {"kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"}
    assert expand("lungs", {"lung_upper_lobe_left", "lung_lower_lobe_right", "liver"}) == {
        "lung_upper_lobe_left", "lung_lower_lobe_right"}
    assert expand("vertebrae", {"vertebrae_L1", "vertebrae_T12", "sacrum"}) == {"vertebrae_L1", "vertebrae_T12"}
    assert expand("body", {"liver", "spleen"}) == set()  # the whole outline only where "body" is itself a label
    assert expand("body", {"body", "liver"}) == {"body", "liver"}
    assert "liver_tumor_necrotic_core" in descendants("liver", every_label())


@pytest.mark.parametrize(
    "organ, lesion",
    [
        ("liver", "hepatic lesion"), ("lungs", "pulmonary nodule"), ("kidney_left", "left renal cyst"),
        ("pancreas", "pancreatic cancer"), ("pancreas", "pancreas tumour"), ("spleen", "splenic lesion"),
        ("kidney_left", "left renal tumour"), ("kidney_right", "right kidney cancer"), ("kidneys", "kidney cancer"),
        ("kidneys", "renal cyst"), ("adrenal_gland_left", "left adrenal mass"), ("adrenal_glands", "adrenal gland tumour"),
        ("colon", "colonic carcinoma"), ("urinary_bladder", "bladder cancer"), ("urinary_bladder", "urinary bladder tumor"),
        ("brain", "cerebral tumour"),
    ],
)
def test_every_organ_includes_its_lesions_as_the_liver_does(organ, lesion):
    # MSD Task07's labels are "pancreas" and "cancer" (named pancreas_tumor): a "pancreas" prompt must not cut the
    # tumour out of its ground truth, as "liver" keeps liver_tumor; "<organ> excluding the tumour" does
    name = canonical_target_name(lesion)
    names = {1: organ, 2: name, 3: "aorta"}
    label_map = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)
    assert ground_truth(Target((organ,)), label_map, names).ravel().tolist() == [False, True, True, False], name
    assert ground_truth(Target((name,)), label_map, names).ravel().tolist() == [False, False, True, False]
    assert name in descendants(organ, every_label())
    display = display_name(organ)
    assert resolve_target(f"{display} excluding the {lesion}", label_names=names) == Target((organ,), (name,))


def test_an_organs_vessels_are_not_its_lesions():
    assert canonical_target_name("hepatic vein") == "liver_vein"  # not a liver structure, as before
    assert not any(v in descendants(o, every_label()) for o in ("liver", "pancreas", "kidneys")
                   for v in ("liver_vein", "liver_vessel", "pancreas_duct", "kidney_artery"))
    assert canonical_target_name("pancreatic gland") == "pancreas" and canonical_target_name("splenic vein") == (
        "portal_vein_and_splenic_vein")


def test_l3_ground_truth_is_mask_algebra(phantom):
    labels, names = phantom.labels, phantom.label_names
    count = {n: int((labels.array == LABEL_IDS[n]).sum()) for n in LABEL_IDS}
    tumor = count["liver_tumor_necrotic_core"] + count["liver_tumor_enhancing_rim"]
    assert tumor > 0
    liver_gt = ground_truth(Target(("liver",)), labels, names)
    without = ground_truth(Target(("liver",), ("liver_tumor",)), labels, names)
    assert liver_gt.sum() == count["liver"] + tumor
    assert without.sum() == liver_gt.sum() - tumor == count["liver"]
    assert not (without & ground_truth(Target(("liver_tumor",)), labels, names)).any()
    rim_only = ground_truth(Target(("liver_tumor",), ("liver_tumor_necrotic_core",)), labels, names)
    assert np.array_equal(rim_only, labels.array == LABEL_IDS["liver_tumor_enhancing_rim"])
    both = ground_truth(Target(("kidneys",)), labels.array, {str(k): v for k, v in names.items()})
    assert both.sum() == sum(count[n] for n in ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"))
    assert not ground_truth(Target(), labels, names).any()



def test_ground_truth_of_a_typed_prompt(phantom):
    """``ground_truth("liver", ...)`` raised AttributeError ('str' has no 'mask'); text is what a user has."""
    labels, names = phantom.labels, phantom.label_names
    assert np.array_equal(ground_truth("liver without the tumour", labels, names),
                          ground_truth(Target(("liver",), ("liver_tumor",)), labels, names))
    assert np.array_equal(ground_truth("left kidney", labels, names), ground_truth(Target(("kidney_left",)), labels, names))
    with pytest.raises(InputError, match="no ground truth for 'xyzzy'"):
        ground_truth("xyzzy", labels, names)

def test_prompts_round_trip_through_json():
    prompt = Prompt("left kidney but not the cyst", "L3", Target(("kidney_left",), ("kidney_cyst_left",)), "ours")
    assert Prompt.from_dict(json.loads(json.dumps(prompt.to_dict()))) == prompt
    with pytest.raises(InputError):
        Prompt("liver", "L9", Target(("liver",)))
    with pytest.raises(InputError):
        Prompt.from_dict({"text": "liver"})


# --- resolving free text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, include, exclude",
    [
        ("Liver excluding the tumour", ["liver"], ["liver_tumor"]),
        ("the LIVER without its tumor", ["liver"], ["liver_tumor"]),
        ("Left kidney, excluding its cyst", ["kidney_left"], ["kidney_cyst_left"]),
        ("necrotic center of the liver lesion", ["liver_tumor_necrotic_core"], []),
        ("enhancing rim but not the necrotic core", ["liver_tumor_enhancing_rim"], []),
        ("lungs minus the LLL", ["lungs"], ["lung_lower_lobe_left"]),
        ("upper lobes of the lungs", ["lung_upper_lobe_left", "lung_upper_lobe_right"], []),
        ("spleen plus liver", ["liver", "spleen"], []),
        ("aorta, IVC and spleen", ["aorta", "inferior_vena_cava", "spleen"], []),
        ("right kidney but not the left one", ["kidney_right"], []),
        ("kidneys except the cysts", ["kidney_left", "kidney_right"], ["kidney_cyst_left", "kidney_cyst_right"]),
        ("the cyst of the right kidney", ["kidney_cyst_right"], []),
        ("the tumour in the liver", ["liver_tumor"], []),
        ("upper lobe of the left lung", ["lung_upper_lobe_left"], []),
    ],
)
def test_resolve_target_understands_new_phrasings(text, include, exclude):
    target = resolve_target(text)
    assert target is not None, text
    names = every_label()
    assert target.labels(names) == Target(tuple(include), tuple(exclude)).labels(names)


@pytest.mark.parametrize("text", ["purple elephant", "a cup of coffee", "", "the quarterly tax report"])
def test_resolve_target_refuses_nonsense(text):
    assert resolve_target(text) is None


def test_every_table_phrasing_resolves_to_its_target():
    table = prompt_table()
    for name, entry in table.entries.items():
        for text in (*entry.names, *(d.text for d in entry.descriptions)):
            assert resolve_target(text) == Target((name,)), text
    for comp in table.compositions:
        assert resolve_target(comp.text.upper()) == comp.target


def test_exclusion_from_the_body_removes_only_the_named_structure():
    # every name lies in the body: "the lungs" are the lungs, not every name with a "lung" word (pulmonary vein)
    names = {1: "body", 2: "lung_upper_lobe_left", 3: "pulmonary_vein", 4: "spleen", 5: "portal_vein_and_splenic_vein"}
    assert resolve_target("body excluding the lungs", label_names=names) == Target(("body",), ("lungs",))
    assert resolve_target("body without the spleen", label_names=names) == Target(("body",), ("spleen",))
    label_map = np.arange(1, 6, dtype=np.uint8).reshape(1, 1, 5)
    truth = ground_truth(resolve_target("body excluding the lungs", label_names=names), label_map, names)
    assert truth.ravel().tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("text", ["the cyst in the liver", "nodule in the liver", "the nodule in the spleen"])
def test_a_lesion_placed_in_an_organ_that_does_not_hold_it_is_not_understood(text):
    # not the kidney cyst or the lung nodule: their ground truth lies elsewhere
    assert resolve_target(text) is None
    assert resolve_target(text, label_names=LABELS) is None


def test_a_lesion_placed_in_part_of_its_organ_group_still_resolves():
    assert resolve_target("the nodule in the left lung") == Target(("lung_nodule",))
    assert resolve_target("the nodule in the right lower lobe") == Target(("lung_nodule",))


def test_segment_meaning_follows_the_resolved_target():
    # colours and DICOM codes read the prompt as ``resolve_target`` does: the table's "sparing" L3 prompt is
    # the liver (not a tumour), and "L"/"R" abbreviations give the laterality the ground truth has
    for text in ("the healthy liver, sparing the tumour", "liver sparing the tumor"):
        assert resolve_target(text) == Target(("liver",), ("liver_tumor",))
        style = lookup(text)
        assert style.type.meaning == "Liver" and style.region is None, text
        assert style.rgb == lookup("liver").rgb
    assert resolve_target("L kidney") == Target(("kidney_left",)) and lookup("L kidney").modifier == LEFT
    assert resolve_target("RT lung") == Target(("lung_right",)) and lookup("RT lung").modifier == RIGHT
    assert lookup("R kidney cyst").region_modifier == RIGHT
    assert lookup("L1 vertebra").modifier is None


def test_resolve_target_knows_a_maps_own_label_names():
    assert resolve_target("Tumor Bed (Left)") is None
    assert resolve_target("Tumor Bed (Left)", label_names={1: "tumor_bed_left"}) == Target(("tumor_bed_left",))


@pytest.mark.parametrize("text", ["caudate lobe", "Caudate_Lobe", "the caudate lobe of the liver"])
def test_a_maps_own_lobe_labels_are_found(text):
    # "lobe" alone means a lung lobe for the table's names; a map's own lobe label must still match itself
    names = {1: "liver", 2: "caudate_lobe", 3: "lung_upper_lobe_left"}
    assert find_target_name(text.replace(" of the liver", ""), known=names.values()) == "caudate_lobe"
    assert resolve_target(text, label_names=names) == Target(("caudate_lobe",))
    assert resolve_target("left upper lobe", label_names=names) == Target(("lung_upper_lobe_left",))


# --- the curated table ----------------------------------------------------------------------------------


def test_table_covers_phantom_and_common_totalsegmentator_targets():
    table = prompt_table()
    for name in (*LABELS.values(), *TOTALSEG_TARGETS, "liver_tumor", "kidney_cyst"):
        entry = table.entries.get(name)
        assert entry is not None and len(entry.descriptions) >= 2, name
    for entry in table.entries.values():
        for d in entry.descriptions:
            assert d.aspect in ("location", "shape", "appearance") and d.source in ("ours", M3D), d
    assert {d.source for e in table.entries.values() for d in e.descriptions} == {"ours", M3D}
    texts = [d.text for e in table.entries.values() for d in e.descriptions]
    assert len(texts) == len(set(texts))
    assert set(table.totalsegmentator_names) >= set(TOTALSEG_TARGETS) - {"kidneys", "lungs", "vertebrae", "lung_left",
                                                                          "lung_right"}


# --- pyramids ------------------------------------------------------------------------------------------------


def test_pyramid_on_a_phantom(phantom):
    labels, names = phantom.labels, phantom.label_names
    prompts = build_prompt_pyramid(labels, names, seed=0, max_l2_per_target=2)
    assert {p.level for p in prompts} == {"L1", "L2", "L3", "negative"}
    for p in prompts:
        voxels = ground_truth(p, labels, names).sum()
        assert (voxels == 0) == (p.level == "negative"), (p.text, p.level, voxels)
    texts = {p.text: p for p in prompts}
    for required in ("liver", "kidneys", "lungs", "liver tumor", "hepatic lesion", "liver excluding the tumor",
                     "necrotic core of the hepatic lesion", "enhancing rim without the necrotic centre", "liver and spleen"):
        assert required in texts, required
    side = phantom.anatomy["lesions"]["kidney_cyst"]["side"]
    assert f"{side} kidney but not the cyst" in texts
    other = "right" if side == "left" else "left"
    assert any(p.level == "negative" and p.target == Target((f"kidney_cyst_{other}",)) for p in prompts)
    nonsense = [p for p in prompts if p.source == "nonsense"]
    assert nonsense and all(resolve_target(p.text) is None for p in nonsense)
    per_target: dict = {}
    for p in prompts:
        if p.level == "L2":
            per_target[p.target] = per_target.get(p.target, 0) + 1
    assert per_target and max(per_target.values()) <= 2


@pytest.mark.parametrize("lesion, organ_group", [("kidney_tumor_left", "kidneys"), ("colon_tumor", "bowel")])
def test_a_map_holding_only_a_lesion_is_not_asked_for_its_organ(lesion, organ_group):
    """A SEG of a kidney tumour alone: "kidneys" with only the tumour as truth would teach the tumour as the organ."""
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1:3, 4:9, 4:9] = 1
    prompts = build_prompt_pyramid(labels, {1: lesion}, seed=0)
    asked = {p.target for p in prompts if p.level != "negative"}
    assert Target((organ_group,)) not in asked and Target((lesion,)) in asked
    with_organ = labels.copy()
    with_organ[1:3, 9:13, 4:9] = 2  # the organ labelled too: the group is asked for again
    organ = {"kidneys": "kidney_left", "bowel": "colon"}[organ_group]
    prompts = build_prompt_pyramid(with_organ, {1: lesion, 2: organ}, seed=0)
    assert Target((organ_group,)) in {p.target for p in prompts if p.level != "negative"}


def test_pyramid_negatives_are_absent_from_the_image_not_just_unlabelled(phantom):
    prompts = build_prompt_pyramid(phantom.labels, phantom.label_names, seed=3, absent=50)
    negatives = [p.target.include[0] for p in prompts if p.level == "negative" and p.source != "nonsense"]
    assert negatives
    for name in negatives:  # no lung lobes (the phantom's lungs have them, unlabelled), no fat or body
        assert name in phantom.label_names.values() or name in {"brain", "thyroid_gland", "prostate",
                                                                  "urinary_bladder", "femur_left", "femur_right", "sacrum"}




def test_pyramid_refuses_a_negative_absent_count(phantom):
    with pytest.raises(InputError, match="-2"):  # not order[:-2], "all but the last two"
        build_prompt_pyramid(phantom.labels, phantom.label_names, seed=3, absent=-2)
    with pytest.raises(InputError, match="nonsense must be a count"):
        build_prompt_pyramid(phantom.labels, phantom.label_names, seed=3, nonsense=-1)
    prompts = build_prompt_pyramid(phantom.labels, phantom.label_names, seed=3, absent=0)
    assert not [p for p in prompts if p.source == "absent structure"]


def test_pyramid_is_seeded(phantom):
    def texts(seed):
        return [p.text for p in build_prompt_pyramid(phantom.labels, phantom.label_names, seed=seed, max_l2_per_target=1)]

    assert texts(1) == texts(1)
    assert any(texts(1) != texts(s) for s in range(2, 6))


def test_left_and_right_prompts_pick_patient_sides_on_a_flipped_volume():
    flipped = make_phantom(seed=11, shape=(24, 80, 80), lesions="all", direction=np.diag([-1.0, 1.0, 1.0]))
    labels, names = flipped.labels, flipped.label_names
    prompts = {p.text: p for p in build_prompt_pyramid(labels, names, seed=0, max_l2_per_target=5)}
    for text, sign in (("left kidney", 1), ("right kidney", -1), ("left lung", 1), ("right lung", -1)):
        x = physical_centroid(labels, ground_truth(prompts[text], labels, names))[0]
        assert np.sign(x) == sign, (text, x)
    described = "the bean-shaped retroperitoneal organ on the patient's left, beside the spine and below the spleen"
    mask = ground_truth(resolve_target(described), labels, names)
    assert physical_centroid(labels, mask)[0] > 30
    # in index space the left kidney now sits at low i: the test would catch an index-space shortcut
    k, j, i = np.nonzero(mask)
    assert i.mean() < labels.shape[2] / 2


def test_pyramid_on_a_totalsegmentator_label_map(totalseg):
    volume, names = totalseg
    array = volume.array
    ids = {v: int(k) for k, v in names.items()}
    prompts = build_prompt_pyramid(volume, names, seed=0)
    by_text = {p.text: p for p in prompts}
    assert ground_truth(by_text["liver"], volume, names).sum() == (array == ids["liver"]).sum() > 0
    kidneys = np.isin(array, [ids[n] for n in ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right")])
    assert np.array_equal(ground_truth(by_text["kidneys"], volume, names), kidneys)
    lobes = [ids[n] for n in names.values() if n.startswith("lung_") and "lobe" in n]
    lungs_without_lll = np.isin(array, lobes) & (array != ids["lung_lower_lobe_left"])
    assert np.array_equal(ground_truth(by_text["lungs excluding the left lower lobe"], volume, names), lungs_without_lll)
    vertebrae = np.isin(array, [ids[n] for n in names.values() if n.startswith("vertebrae_")])
    assert np.array_equal(ground_truth(by_text["vertebrae"], volume, names), vertebrae)
    for p in prompts:
        empty = not ground_truth(p, volume, names).any()
        assert empty == (p.level == "negative"), p.text
        assert p.target.include[:1] not in (("fat",), ("body",), ("muscle",)) or p.level != "negative"
    # patient sides in physical space on a file stored with x pointing to the patient's right
    assert volume.direction[0, 0] == -1
    left = physical_centroid(volume, ground_truth(by_text["left kidney"], volume, names))
    right = physical_centroid(volume, ground_truth(by_text["right kidney"], volume, names))
    spleen = physical_centroid(volume, ground_truth(by_text["spleen"], volume, names))
    liver = physical_centroid(volume, ground_truth(by_text["liver"], volume, names))
    assert left[0] > right[0] and spleen[0] > liver[0]


def test_min_voxels_drops_slivers(totalseg):
    volume, names = totalseg
    counts = np.bincount(volume.array.ravel())
    assert counts[int(next(k for k, v in names.items() if v == "lung_middle_lobe_right"))] == 1  # a one-voxel sliver
    texts = {p.text for p in build_prompt_pyramid(volume, names, min_voxels=10)}
    assert "right middle lobe of the lung" not in texts and "liver" in texts
    assert "right middle lobe of the lung" in {p.text for p in build_prompt_pyramid(volume, names)}
