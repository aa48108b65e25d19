"""Auxiliary prompt lookup: the curated table, the fallback order and the opt-in LLM hook."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from TextSegmentLib.aux_prompts import (
    AuxPrompt,
    DESCRIPTIONS_PATH,
    LLMAnswerCache,
    LLMEndpoint,
    find_description,
    load_clinical_descriptions,
    normalise_target,
    resolve_aux_prompt,
    resolve_aux_prompts,
    template_description,
)
from TextSegmentLib.errors import InputError

LLM_ENV = ("TEXTSEGMENT_LLM_URL", "TEXTSEGMENT_LLM_KEY", "TEXTSEGMENT_LLM_MODEL", "TEXTSEGMENT_LLM_TIMEOUT")
ALLOWED_SOURCES = {"curated (TextSegment)", "adapted from M3D term dictionary (MIT)"}
COMMON_LESIONS = [
    "liver tumour", "liver cyst", "liver metastases", "kidney tumor", "kidney cyst", "kidney stone",
    "pancreatic tumor", "lung nodule", "lung tumor", "ground-glass opacity", "COVID-19 infection",
    "pleural effusion", "enlarged lymph node", "adrenal adenoma", "colon cancer", "bone metastasis",
    "intracranial haemorrhage", "aortic aneurysm", "pulmonary embolism",
]


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No developer LLM settings leak in; the answer cache lives in a temporary home."""
    for name in LLM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEXTSEGMENT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class FakeLLM:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records what it is asked."""

    def __init__(self, *, answer: str = "Fake answer about the target.", status: int = 200, body: bytes | None = None):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "json": json.loads(self.rfile.read(length))}
                )
                payload = body if body is not None else json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_normalise_target_folds_case_spelling_filler_and_side():
    assert normalise_target("Segment the LEFT kidney") == "kidney left"
    assert normalise_target("kidney_left") == "kidney left"
    assert normalise_target("left kidney") == "kidney left"
    assert normalise_target("Liver tumour.") == "liver tumor"
    assert normalise_target("COVID-19 infection") == "covid 19 infection"
    assert normalise_target("vertebrae_L1") == "vertebrae l1"
    assert normalise_target("L1 vertebra") == "l1 vertebrae"
    assert normalise_target("  the  ") == ""


def test_every_totalsegmentator_class_has_a_described_entry(shared_data):
    class_maps = json.loads((shared_data / "ct" / "totalsegmentator_class_maps.json").read_text())
    names = {name for task in class_maps.values() for name in task.values()}
    assert len(names) > 117
    table = load_clinical_descriptions()
    missing = sorted(n for n in names if normalise_target(n) not in table)
    assert not missing
    for name in names:
        entry = table[normalise_target(name)]
        assert entry.source in ALLOWED_SOURCES
        assert "CT" in entry.text and len(entry.text.split()) >= 15


def test_common_lesions_are_described():
    for lesion in COMMON_LESIONS:
        entry = find_description(lesion)
        assert entry is not None, lesion
        assert entry.category == "lesion", (lesion, entry.key)


def test_table_is_consistent_and_fits_a_clip_context():
    import open_clip

    raw = json.loads(DESCRIPTIONS_PATH.read_text())
    assert set(raw["_about"]["sources"]) == ALLOWED_SOURCES
    owner: dict[str, str] = {}
    for key, entry in raw["descriptions"].items():
        assert entry["source"] in ALLOWED_SOURCES, key
        assert normalise_target(key) == key, f"key {key!r} is not in normalised form"
        for phrase in [key, *entry["aliases"]]:
            phrase = normalise_target(phrase)
            assert owner.setdefault(phrase, key) == key, f"{phrase!r} names both {owner[phrase]!r} and {key!r}"
    tokens = open_clip.get_tokenizer("ViT-B-32")([e["text"] for e in raw["descriptions"].values()], context_length=200)
    assert int((tokens != 0).sum(1).max()) <= 77, "a description would be cut by a 77-token CLIP tokenizer"


def test_lookup_finds_names_aliases_and_targets_inside_sentences():
    assert find_description("right kidney").key == "kidney right"
    assert find_description("left 5th rib").key == "rib 5 left"
    assert find_description("segment the liver tumour in this slice").key == "liver tumor"  # longest phrase wins
    assert find_description("the liver").key == "liver"
    assert find_description("flux capacitor") is None


@pytest.mark.parametrize(
    "prompt, key",
    [
        ("lungs excluding the nodule", "lung"),  # the pyramid's L3 prompts: never the excluded structure's text
        ("liver without the gallbladder", "liver"),
        ("the healthy liver, sparing the tumour", "liver"),
        ("kidneys excluding the left kidney", "kidney"),
        ("left kidney but not the cyst", "kidney left"),
    ],
)
def test_exclusions_are_described_by_what_is_kept(prompt, key):
    assert find_description(prompt).key == key


def test_the_shipped_weights_description_of_exclusions_stays_available():
    """tgcnet-tiny was trained with the whole prompt searched; its config keeps that (aux_kept_only False)."""
    assert find_description("liver without the gallbladder", kept_only=False).key == "gallbladder"
    assert resolve_aux_prompt("lungs excluding the nodule", use_llm=False, kept_only=False).detail.startswith("lung nodule")
    assert resolve_aux_prompt("lungs excluding the nodule", use_llm=False).detail.startswith("lung ")


def test_fallback_order_user_curated_template_primary():
    assert resolve_aux_prompt("spleen", user_text="  my own words ") == AuxPrompt("my own words", "user")
    curated = resolve_aux_prompt("spleen", user_text="   ")
    assert curated.source == "curated" and curated.text.startswith("Spleen")
    assert "spleen" in curated.detail and "M3D" in curated.detail
    template = resolve_aux_prompt("left flux capacitor")
    assert template.source == "template"
    assert template.text == template_description("left flux capacitor") and "left side" in template.text
    assert "focal abnormality" in template_description("strange nodule")
    long_text = "a strange bright ring near the hmm something seen on this particular frame"
    assert resolve_aux_prompt(long_text) == resolve_aux_prompt(long_text, use_llm=False)
    assert resolve_aux_prompt(long_text).source == "primary" and resolve_aux_prompt(long_text).text == long_text


def test_resolve_many_pairs_user_texts_with_prompts():
    got = resolve_aux_prompts(["liver", "spleen"], [None, "custom"])
    assert [a.source for a in got] == ["curated", "user"]
    with pytest.raises(InputError, match="one per prompt"):
        resolve_aux_prompts(["liver", "spleen"], ["only one"])


def test_llm_is_never_called_unless_configured(isolated_environment):
    with FakeLLM() as llm:
        assert LLMEndpoint.from_environment() is None
        assert resolve_aux_prompt("spleen").source == "curated"
        assert resolve_aux_prompt("left flux capacitor").source == "template"
        assert llm.requests == []
    assert not (isolated_environment / "aux_prompts_llm_cache.json").exists()


def test_configured_llm_is_called_once_and_cached(monkeypatch, isolated_environment):
    with FakeLLM(answer="  Spleen:\n a crescent   organ.  ") as llm:
        monkeypatch.setenv("TEXTSEGMENT_LLM_URL", llm.url)
        monkeypatch.setenv("TEXTSEGMENT_LLM_KEY", "sk-test")
        monkeypatch.setenv("TEXTSEGMENT_LLM_MODEL", "tiny-model")
        monkeypatch.setenv("TEXTSEGMENT_LLM_TIMEOUT", "5")
        first = resolve_aux_prompt("the Spleen")
        second = resolve_aux_prompt("spleen")
        assert first == second
        assert first.source == "llm" and first.text == "Spleen: a crescent organ." and first.detail == "tiny-model"
        assert len(llm.requests) == 1
        request = llm.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["auth"] == "Bearer sk-test"
        assert request["json"]["model"] == "tiny-model"
        assert "the Spleen" in request["json"]["messages"][-1]["content"]
        assert resolve_aux_prompt("spleen", use_llm=False).source == "curated"  # opting out per call
        assert resolve_aux_prompt("spleen", user_text="mine").source == "user"  # the user still comes first
        assert len(llm.requests) == 1
    cached = json.loads((isolated_environment / "aux_prompts_llm_cache.json").read_text())
    assert cached == {"tiny-model|spleen": "Spleen: a crescent organ."}
    assert "sk-test" not in repr(LLMEndpoint.from_environment())


@pytest.mark.parametrize("status,body", [(500, b"{}"), (200, b"not json"), (200, b'{"choices": []}')])
def test_llm_failures_fall_back_to_the_next_source(monkeypatch, caplog, isolated_environment, status, body):
    with FakeLLM(status=status, body=body) as llm:
        endpoint = LLMEndpoint(url=llm.url, timeout_s=5)
        with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_prompts"):
            got = resolve_aux_prompt("spleen", llm=endpoint)
        assert got.source == "curated"
        assert len(llm.requests) == 1
        assert "model" not in llm.requests[0]["json"]  # no model configured: none sent
    assert "using the next source" in caplog.text and "TEXTSEGMENT_LLM_MODEL" in caplog.text
    assert LLMAnswerCache().read() == {}  # failures are not cached


def test_non_http_endpoint_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_prompts"):
        got = resolve_aux_prompt("spleen", llm=LLMEndpoint(url="file:///etc"))
    assert got.source == "curated"
    assert "http(s)" in caplog.text
