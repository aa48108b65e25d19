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

    def __init__(self, *, answer="Fake answer about the target.", status: int = 200, body: bytes | None = None,
                 headers: dict | None = None):
        """``answer`` may be a function of the request's JSON; ``headers`` are added to the reply."""
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"null")
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "json": request})
                content = answer(request) if callable(answer) else answer
                payload = body if body is not None else json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST  # noqa: N815 (urllib turns a redirected POST into a GET)

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
    assert cached == {f"tiny-model|{llm.url}/chat/completions|spleen": "Spleen: a crescent organ."}
    assert "sk-test" not in repr(LLMEndpoint.from_environment())


@pytest.mark.parametrize("status,body", [(500, b"{}"), (200, b"not json"), (200, b'{"choices": []}')])
def test_llm_failures_fall_back_to_the_next_source(monkeypatch, caplog, isolated_environment, status, body):
    with FakeLLM(status=status, body=body) as llm:
        endpoint = LLMEndpoint(url=llm.url, timeout_s=5)
        with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
            got = resolve_aux_prompt("spleen", llm=endpoint)
        assert got.source == "curated"
        assert len(llm.requests) == 1
        assert "model" not in llm.requests[0]["json"]  # no model configured: none sent
    assert "using the next source" in caplog.text and "TEXTSEGMENT_LLM_MODEL" in caplog.text
    assert LLMAnswerCache().read() == {}  # failures are not cached


def test_non_http_endpoint_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
        got = resolve_aux_prompt("spleen", llm=LLMEndpoint(url="file:///etc"))
    assert got.source == "curated"
    assert "http(s)" in caplog.text


def _use_llm(monkeypatch, llm, *, key=None, model="tiny-model", timeout="5"):
    monkeypatch.setenv("TEXTSEGMENT_LLM_URL", llm.url)
    monkeypatch.setenv("TEXTSEGMENT_LLM_TIMEOUT", timeout)
    if model:
        monkeypatch.setenv("TEXTSEGMENT_LLM_MODEL", model)
    if key:
        monkeypatch.setenv("TEXTSEGMENT_LLM_KEY", key)


@pytest.mark.parametrize("variable", ["TEXTSEGMENT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_never_asks_the_llm_but_still_reads_its_cache(monkeypatch, caplog, variable):
    with FakeLLM(answer="Spleen from the LLM.") as llm:
        _use_llm(monkeypatch, llm)
        assert resolve_aux_prompt("spleen").source == "llm"  # online: asked once, cached
        monkeypatch.setenv(variable, "1")
        with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
            assert resolve_aux_prompt("spleen") == AuxPrompt("Spleen from the LLM.", "llm", "tiny-model")
            assert resolve_aux_prompt("liver").source == "curated"
        assert len(llm.requests) == 1
    assert "offline" in caplog.text


def test_a_redirect_is_not_followed_with_the_key(monkeypatch):
    with FakeLLM(answer="Answer from elsewhere.") as elsewhere:
        with FakeLLM(status=302, body=b"", headers={"Location": elsewhere.url.replace("127.0.0.1", "localhost")}) as llm:
            _use_llm(monkeypatch, llm, key="sk-secret-redirect")
            got = resolve_aux_prompt("spleen")
            assert len(llm.requests) == 1
        assert elsewhere.requests == []  # neither the key nor the question went to the other host
    assert got.source == "curated"
    assert LLMAnswerCache().read() == {}


def test_the_key_and_url_credentials_never_reach_the_log(monkeypatch, caplog):
    with FakeLLM() as llm, caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
        _use_llm(monkeypatch, llm, key="sk-SE\nCRET-header")  # an illegal header value: http.client echoes it
        assert resolve_aux_prompt("spleen").source == "curated"
        port = llm.url.split(":")[-1].split("/")[0]
        _use_llm(monkeypatch, llm, key="sk-fine")
        monkeypatch.setenv("TEXTSEGMENT_LLM_URL", f"http://user:sk-URLSECRET@127.0.0.1:{port}/v1")
        assert resolve_aux_prompt("liver").source == "curated"
        assert llm.requests == []
    assert caplog.text
    for secret in ("SE\nCRET", "SE\\nCRET", "CRET-header", "URLSECRET"):
        assert secret not in caplog.text


def test_the_key_is_stripped_of_surrounding_whitespace(monkeypatch):
    with FakeLLM() as llm:
        _use_llm(monkeypatch, llm, key=" sk-test\r\n")
        assert resolve_aux_prompt("spleen").source == "llm"
        assert llm.requests[0]["auth"] == "Bearer sk-test"


def test_answers_are_cached_per_endpoint_and_the_cache_holds_no_secret(monkeypatch, isolated_environment):
    with FakeLLM(answer="Answer of server one.") as one, FakeLLM(answer="Answer of server two.") as two:
        _use_llm(monkeypatch, one, key="sk-cache-secret")
        assert resolve_aux_prompt("spleen").text == "Answer of server one."
        monkeypatch.setenv("TEXTSEGMENT_LLM_URL", two.url + "/?api_key=sk-query-secret")
        assert resolve_aux_prompt("spleen").text == "Answer of server two."  # same model name, other server
        assert len(one.requests) == len(two.requests) == 1
        assert two.requests[0]["path"] == "/v1/chat/completions?api_key=sk-query-secret"  # the query stays last
    text = (isolated_environment / "aux_prompts_llm_cache.json").read_text()
    assert "secret" not in text and len(json.loads(text)) == 2


def test_prompts_in_other_scripts_do_not_share_an_answer(monkeypatch):
    with FakeLLM(answer=lambda request: "About " + request["messages"][-1]["content"]) as llm:
        _use_llm(monkeypatch, llm)
        assert resolve_aux_prompt("肝脏").text == "About Describe: 肝脏"
        assert resolve_aux_prompt("脾脏").text == "About Describe: 脾脏"
        assert resolve_aux_prompt("Hépatique").text != resolve_aux_prompt("Hôpatique").text
        assert len(llm.requests) == 4


@pytest.mark.parametrize("content", [None, 42, ["Spleen."], {"text": "Spleen."}, "  \x00\x1b  "])
def test_an_answer_that_is_not_text_is_not_accepted(monkeypatch, content):
    with FakeLLM(answer=content) as llm:
        _use_llm(monkeypatch, llm)
        got = resolve_aux_prompt("spleen")
        assert len(llm.requests) == 1
    assert got.source == "curated"
    assert LLMAnswerCache().read() == {}


def test_control_and_invisible_characters_are_removed_from_answers(monkeypatch):
    with FakeLLM(answer="Spleen\x1b[31m:\x00 a\u202e crescent\u200b organ\x07.\ud800") as llm:
        _use_llm(monkeypatch, llm)
        got = resolve_aux_prompt("spleen")
    assert got.source == "llm"
    assert got.text == "Spleen [31m: a crescent organ ."
    got.text.encode("utf-8")  # no lone surrogate either


def test_an_oversized_answer_is_refused_without_reading_it_all(monkeypatch):
    with FakeLLM(answer="x " * (1 << 20)) as llm:
        _use_llm(monkeypatch, llm)
        assert resolve_aux_prompt("spleen").source == "curated"


def test_answers_are_capped_in_length(monkeypatch):
    with FakeLLM(answer="word " * 1000) as llm:
        _use_llm(monkeypatch, llm)
        got = resolve_aux_prompt("spleen")
    assert got.source == "llm" and len(got.text) <= 600


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"choices": [{"message": {"content": "\xe9t\xe9"}}]}'])
def test_a_malformed_or_non_utf8_answer_falls_back(monkeypatch, body):
    with FakeLLM(body=body) as llm:
        _use_llm(monkeypatch, llm)
        assert resolve_aux_prompt("spleen").source == "curated"
        assert len(llm.requests) == 1


def test_a_utf8_answer_with_a_byte_order_mark_is_read(monkeypatch):
    body = b"\xef\xbb\xbf" + json.dumps({"choices": [{"message": {"content": "Spleen: an organ."}}]}).encode()
    with FakeLLM(body=body) as llm:
        _use_llm(monkeypatch, llm)
        assert resolve_aux_prompt("spleen") == AuxPrompt("Spleen: an organ.", "llm", "tiny-model")


def test_a_trickling_answer_is_cut_off_by_the_timeout(monkeypatch):
    import time

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "400")
            self.end_headers()
            try:
                for _ in range(400):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        endpoint = LLMEndpoint(url=f"http://127.0.0.1:{server.server_address[1]}/v1", timeout_s=0.5)
        start = time.monotonic()
        assert resolve_aux_prompt("spleen", llm=endpoint).source == "curated"
        assert time.monotonic() - start < 3  # every byte came within the socket timeout, the whole did not
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1", "0", "1e300"])
def test_an_unusable_timeout_setting_falls_back_to_the_default(monkeypatch, caplog, timeout):
    with FakeLLM() as llm:
        _use_llm(monkeypatch, llm, timeout=timeout)
        assert resolve_aux_prompt("spleen").source == "llm"


def test_a_plain_http_endpoint_with_a_key_warns(monkeypatch, caplog):
    with FakeLLM() as llm, caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
        _use_llm(monkeypatch, llm, key="sk-local")
        assert resolve_aux_prompt("spleen").source == "llm"
        assert "unencrypted" not in caplog.text  # a local server: the key never leaves the machine
        endpoint = LLMEndpoint(url="http://192.0.2.1:9/v1", key="sk-remote", timeout_s=0.2)  # TEST-NET, never answers
        assert resolve_aux_prompt("liver", llm=endpoint).source == "curated"
    assert "unencrypted" in caplog.text and "sk-remote" not in caplog.text


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"KEY": 5}', b'{"KEY": ["x"]}', b"\xff\xfe\x00", b"[]"])
def test_a_corrupt_cache_is_ignored_with_a_warning(monkeypatch, caplog, isolated_environment, content):
    with FakeLLM(answer="Fresh answer.") as llm:
        _use_llm(monkeypatch, llm)
        key = LLMAnswerCache.key(LLMEndpoint.from_environment(), "spleen")
        isolated_environment.mkdir(parents=True)
        (isolated_environment / "aux_prompts_llm_cache.json").write_bytes(content.replace(b"KEY", key.encode()))
        with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
            assert resolve_aux_prompt("spleen") == AuxPrompt("Fresh answer.", "llm", "tiny-model")
    assert "LLM answer cache" in caplog.text
    assert LLMAnswerCache().read() == {key: "Fresh answer."}  # rewritten whole


def test_concurrent_writers_never_fail_or_corrupt_the_cache(caplog, isolated_environment):
    """Two processes writing one cache (threads with their own locks here) must not share a scratch file."""
    import sys

    path = isolated_environment / "aux_prompts_llm_cache.json"
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        cache = LLMAnswerCache(path)
        cache._lock = threading.Lock()  # as if in another process
        try:
            for i in range(150):
                cache.put(f"{name}{i}", "x")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with caplog.at_level(logging.WARNING, logger="TextSegmentLib.aux_llm"):
            threads = [threading.Thread(target=writer, args=(name,)) for name in "ab"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert "LLM answer cache" not in caplog.text
    assert isinstance(json.loads(path.read_text()), dict)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no scratch file left behind
