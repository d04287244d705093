"""scripts.make_dataset: Markdown to heading-path slices, lenient answer parsing, and the
generator end to end, against a scripted OpenAI-compatible stub (exact counts, the concurrency
bound) and against the tester itself on the real 135M model (the wiring, whatever it answers)."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from scripts.make_dataset import (
    DEFAULT_TEMPLATE,
    DatasetJobError,
    Job,
    Slice,
    check_template,
    fill_template,
    load_slices,
    main,
    parse_markdown,
    parse_pairs,
    run_job,
    section_slices,
    split_long,
)
from scripts.sft_data import load_sft_dataset

DOCS = Path(__file__).parent / "data" / "docs"


def tree(section) -> dict:
    """A section tree as nested {title: children}, for comparing shapes."""
    return {child.title: tree(child) for child in section.children}


# --------------------------------------------------------------------------- Markdown


def test_heading_tree_nests_by_level_and_keeps_code_fences_verbatim():
    root = parse_markdown((DOCS / "guide.md").read_text(encoding="utf-8"), "guide")
    assert tree(root) == {
        "Widget Guide": {"Installation": {"Linux": {}, "macOS": {}}, "Usage": {"Deep option": {}}},
        "Appendix": {},
    }
    # text before the first heading belongs to the document
    assert root.text.startswith("This preamble comes before any heading")
    guide = root.children[0]
    install, usage = guide.children
    # '#' lines inside a backtick fence are code, kept with the fence as written
    assert "```bash\n# this line is a shell comment, not a heading\npip install widget\n## neither is this one\n```" in install.text
    # a ``` line inside a ~~~ fence does not close it
    assert '# a Python comment inside a tilde fence\nprint("# still code")\n```\nthe backticks above' in usage.text
    assert usage.title == "Usage"  # the closing '##' is not part of the title
    assert install.children[1].blocks == []  # macOS: an empty section
    assert usage.children[0].level == 4  # '####' under '##' nests under it
    assert "#NoSpaceIsNotAHeading" in root.children[1].text


def test_setext_headings_and_front_matter():
    root = parse_markdown((DOCS / "faq.md").read_text(encoding="utf-8"), "faq")
    assert tree(root) == {"Frequently Asked Questions": {"Does it work offline?": {}, "What licence?": {}}}
    assert root.text == ""  # the front matter is neither text nor a heading
    assert root.children[0].level == 1 and root.children[0].children[0].level == 2


def test_unclosed_fence_runs_to_the_end():
    root = parse_markdown("# A\n\n```\n# inside\n\n## still inside\n", "doc")
    assert tree(root) == {"A": {}}
    assert root.children[0].text == "```\n# inside\n\n## still inside"


def test_slices_carry_heading_paths_in_document_order():
    files, slices = load_slices(DOCS, min_chars=1)
    assert [f.relative_to(DOCS).as_posix() for f in files] == ["faq.md", "guide.md", "nested/deep.md"]  # notes.txt is not Markdown
    assert [(s.doc, s.heading_path) for s in slices] == [
        ("faq.md", "Frequently Asked Questions"),
        ("faq.md", "Frequently Asked Questions -> Does it work offline?"),
        ("guide.md", "guide"),
        ("guide.md", "Widget Guide"),
        ("guide.md", "Widget Guide -> Installation"),
        ("guide.md", "Widget Guide -> Installation -> Linux"),
        ("guide.md", "Widget Guide -> Usage"),
        ("guide.md", "Widget Guide -> Usage -> Deep option"),
        ("guide.md", "Appendix"),
        ("nested/deep.md", "Internals -> Gears"),
    ]  # empty sections (macOS, What licence?, Internals) give none
    linux = slices[5]
    assert linux.text == "On Linux, widgets need libsprocket 2.4 or later."
    # the short-section floor
    _, kept = load_slices(DOCS, min_chars=40)
    assert "Widget Guide -> Installation -> Linux" in [s.heading_path for s in kept]
    assert "Frequently Asked Questions" not in [s.heading_path for s in kept]


def test_long_sections_are_cut_between_blocks():
    fence = "```\n" + "\n\n".join(f"line {i}" for i in range(20)) + "\n```"  # blank lines inside the code
    paragraphs = [f"Paragraph {i}" + " word" * 30 for i in range(6)]
    text = "\n\n".join(paragraphs[:3] + [fence] + paragraphs[3:])
    root = parse_markdown("# A\n\n## B\n\n" + text + "\n", "d")
    [piece] = [s for s in section_slices(root, "d.md") if s.headings == ("A", "B")]
    assert piece.text == text
    parts = split_long(piece, max_chars=400)
    assert len(parts) > 1
    assert all(len(p.text) <= 400 for p in parts)
    assert [p.heading_path for p in parts][:2] == [f"A -> B (part 1/{len(parts)})", f"A -> B (part 2/{len(parts)})"]
    assert any(p.text.count(fence) == 1 for p in parts)  # the code block stays whole
    assert "\n\n".join(p.text for p in parts) == text


# --------------------------------------------------------------------------- prompts and answers


def test_template_fills_only_its_placeholders():
    piece = Slice("d.md", ("Guide", "Install"), 'Literal {project_name} and {"json": 1} in the docs.')
    prompt = fill_template(DEFAULT_TEMPLATE, "Widget", piece, 4)
    assert "questions about Widget" in prompt and '"Guide -> Install"' in prompt and "Write 4 question" in prompt
    assert 'Literal {project_name} and {"json": 1} in the docs.' in prompt  # the slice is not re-filled
    assert '[{"question": "...", "answer": "..."}]' in prompt  # the template's JSON example keeps its braces
    with pytest.raises(DatasetJobError, match="document_slice"):
        check_template("Ask about {heading_path}")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('[{"question": "Q1?", "answer": "A1."}]', [("Q1?", "A1.")]),
        ('Sure! Here you go:\n```json\n[{"question": "Q1?", "answer": "A1."},\n {"question": "Q2?", "answer": "A2."}]\n```\nEnjoy.',
         [("Q1?", "A1."), ("Q2?", "A2.")]),
        ('{"pairs": [{"Question": " Q1? ", "Answer": "A1."}]}', [("Q1?", "A1.")]),  # nested, keys case aside
        ('[{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "ans', [("Q1?", "A1.")]),  # cut off by max_tokens
        ('[{"question": "", "answer": "A"}, {"question": "Q?", "answer": 3}, "x", {"question": "Q3?", "answer": "A3."}]',
         [("Q3?", "A3.")]),  # invalid items dropped
        ('[{"question": "Q?", "answer": "A."}, {"question": "Q?", "answer": "again"}]', [("Q?", "A.")]),
        ("see [1] and [2]", []),
        ('[{"question": "", "answer": ""}]', []),
        ('{"question": "Q?", "answer": "A."}', []),  # not an array
        ("", []),
    ],
)
def test_answers_are_parsed_leniently(answer, expected):
    assert parse_pairs(answer) == expected


# --------------------------------------------------------------------------- against a scripted stub


class StubOpenAI:
    """An OpenAI-compatible endpoint that answers by the marker in each prompt's section:
    GOOD valid at once, ONCE malformed then valid, BAD malformed every time, FENCED valid
    inside prose and a code fence. It records every prompt and the most requests it had in
    flight at once."""

    def __init__(self, delay_s: float = 0.2):
        self.delay_s = delay_s
        self.api_key = None
        self.prompts: list[str] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        return self.route(Request(environ))(environ, start_response)

    def route(self, request: Request) -> Response:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.json({"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
        if request.path == "/v1/models":
            return self.json({"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0, "owned_by": "test"}]})
        if request.path != "/v1/chat/completions":
            return self.json({"error": {"message": "no route"}}, 404)
        body = request.get_json()
        if body["model"] != "stub-model":
            return self.json({"error": {"message": f"model {body['model']} not found", "code": "model_not_found"}}, 404)
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(prompt)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            marker = re.search(r"\b(GOOD|ONCE|BAD|FENCED)-\d+", prompt).group(0)
            with self.lock:
                attempt = self.attempts[marker] = self.attempts.get(marker, 0) + 1
            content = self.answer(marker, attempt)
        finally:
            with self.lock:
                self.in_flight -= 1
        return self.json({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    @staticmethod
    def answer(marker: str, attempt: int) -> str:
        pairs = json.dumps([{"question": f"What is {marker}?", "answer": f"{marker} is a section."},
                            {"question": f"Why {marker}?", "answer": "Because the docs say so."}])
        kind = marker.split("-")[0]
        if kind == "BAD" or (kind == "ONCE" and attempt == 1):
            return "I'm sorry, here are some questions: what is it? why?"
        if kind == "FENCED":
            return f"Here are the pairs:\n```json\n{pairs}\n```"
        return pairs

    @staticmethod
    def json(payload, status: int = 200) -> Response:
        return Response(json.dumps(payload), status=status, content_type="application/json")


@pytest.fixture()
def stub():
    endpoint = StubOpenAI()
    server = make_server("127.0.0.1", 0, endpoint, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint.url = f"http://127.0.0.1:{server.server_port}/v1"
    yield endpoint
    server.shutdown()
    thread.join(timeout=10)


def write_docs(folder: Path, markers: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sections = "\n\n".join(f"## Section {m}\n\nThis section documents {m} in enough words to be kept." for m in markers)
    (folder / "manual.md").write_text(f"# Manual\n\n{sections}\n", encoding="utf-8")
    return folder


def test_generator_counts_retries_skips_and_bounds_concurrency(tmp_path, stub):
    markers = ["GOOD-1", "ONCE-1", "GOOD-2", "BAD-1", "FENCED-1", "GOOD-3", "ONCE-2", "GOOD-4"]
    files, slices = load_slices(write_docs(tmp_path / "docs", markers))
    out = tmp_path / "out" / "qa.jsonl"
    job = Job(base_url=stub.url, project_name="Widget", n_pairs=2, concurrency=3, retries=2)

    summary = run_job(job, slices, out, docs=len(files))

    assert summary.slices == 8
    assert summary.requests == 4 * 1 + 2 * 2 + 1 * 3 + 1  # GOOD once, ONCE twice, BAD 1 + 2 retries, FENCED once
    assert summary.malformed == 2 + 3
    assert summary.retried == 2 + 2
    assert summary.skipped == 1 and summary.errors == 0
    assert summary.pairs == 7 * 2
    assert stub.max_in_flight == 3  # the bound, reached
    assert stub.attempts["BAD-1"] == 3

    conversations = load_sft_dataset(out)
    assert len(conversations) == 14
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    sources = list(dict.fromkeys(r["source"] for r in records))
    assert sources == [f"Manual -> Section {m}" for m in markers if m != "BAD-1"]  # document order
    assert records[0]["messages"][0]["content"] == "What is GOOD-1?" and records[0]["doc"] == "manual.md"
    assert not [p for p in out.parent.iterdir() if p.name != "qa.jsonl"]  # no temporary file left
    assert all("questions about Widget" in p and "Write 2 question" in p for p in stub.prompts)


def test_command_line_exit_codes_and_template(tmp_path, stub):
    docs = write_docs(tmp_path / "docs", ["GOOD-1", "BAD-1"])
    template = tmp_path / "template.txt"
    template.write_text('Section "{heading_path}" of {project_name}:\n{document_slice}\nJSON: [{"question", "answer"}]')
    out = tmp_path / "qa.jsonl"
    assert main(["--docs", str(docs), "--out", str(out), "--base-url", stub.url, "--template", str(template),
                 "--retries", "0", "--concurrency", "2", "--project-name", "Widget"]) == 0
    assert len(load_sft_dataset(out)) == 2
    assert any(p.startswith('Section "Manual -> Section GOOD-1" of Widget:') for p in stub.prompts)

    # nothing valid: exit 1, the file still written (empty)
    bad_docs = write_docs(tmp_path / "bad", ["BAD-2"])
    assert main(["--docs", str(bad_docs), "--out", str(out), "--base-url", stub.url, "--retries", "1"]) == 1
    assert out.read_text() == ""

    # an endpoint that cannot be used: exit 2, nothing written
    stub.api_key = "secret"
    other = tmp_path / "other.jsonl"
    assert main(["--docs", str(docs), "--out", str(other), "--base-url", stub.url]) == 2
    assert main(["--docs", str(docs), "--out", str(other), "--base-url", stub.url, "--api-key", "secret"]) == 0
    kept = other.read_text()
    assert main(["--docs", str(docs), "--out", str(other), "--base-url", stub.url, "--api-key", "secret",
                 "--model", "no-such-model"]) == 2  # a 404 for every slice stops the run
    assert other.read_text() == kept  # and leaves the earlier output alone
    assert main(["--docs", str(docs), "--out", str(other), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert main(["--docs", str(docs), "--out", str(tmp_path / "qa.json"), "--base-url", stub.url]) == 2
    assert main(["--docs", str(tmp_path / "nowhere"), "--out", str(other)]) == 2


# --------------------------------------------------------------------------- against the tester itself


@pytest.mark.slow
def test_generator_against_the_real_tester(tmp_path, live_server):
    """SmolLM2-135M seldom writes valid JSON, so this proves the wiring, not the data: every
    slice is asked, malformed answers are counted and retried without a crash, and whatever
    came back is a file the training loader reads."""
    files, slices = load_slices(DOCS / "guide.md")
    slices = slices[:3]
    out = tmp_path / "qa.jsonl"
    job = Job(base_url=live_server.url + "/v1", project_name="Widget", n_pairs=2, concurrency=2, retries=1,
              max_tokens=96, timeout_s=120)

    summary = run_job(job, slices, out, docs=len(files))

    assert summary.errors == 0
    assert summary.requests == summary.slices + summary.retried
    assert summary.slices <= summary.requests <= 2 * summary.slices
    assert summary.malformed == summary.retried + summary.skipped  # each retry and each skip follows a malformed answer
    assert out.is_file()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == summary.pairs
    if lines:
        assert len(load_sft_dataset(out)) == summary.pairs
