"""Data set loading, selection, fingerprints and synthetic problems."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacore.errors import DatasetError, UsageError
from pacore.eval import Problem, dataset_fingerprint, grade, load_dataset, synthetic_problems, write_jsonl


def write_lines(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- the real files -----------------------------------------------------------


def test_gsm8k_file(shared_data: Callable[[str], Path]) -> None:
    problems = load_dataset(shared_data("gsm8k_test_1000.jsonl"))
    assert len(problems) == 1000
    first = problems[0]
    assert first.id == "gsm8k_test_1000-1"
    assert first.answer == "18"
    assert first.kind == "gsm8k"
    assert first.text.startswith("Janet’s ducks lay 16 eggs")
    assert first.messages == [{"role": "user", "content": first.text}]
    assert first.metadata["solution"].endswith("#### 18")
    assert problems[2].answer == "70000"
    assert all(p.answer is not None and p.answer.lstrip("-").replace(".", "").isdigit() for p in problems)
    # The solution text itself grades as correct: the "#### N" convention is understood.
    assert all(grade(p.metadata["solution"], p.answer, p.kind) for p in problems[:50])


def test_reference_release_file(shared_data: Callable[[str], Path]) -> None:
    problems = load_dataset(shared_data("pacore_sample_questions.jsonl"))
    by_id = {p.id: p for p in problems}
    assert list(by_id) == ["math_001", "math_002", "logic_001", "code_001", "physics_001"]
    assert by_id["math_001"].answer == "5050"
    assert by_id["math_002"].answer == "32 cm²"
    assert by_id["code_001"].answer is None
    assert by_id["logic_001"].metadata == {"category": "logic"}
    assert by_id["physics_001"].text.startswith("A ball is thrown upward")
    assert grade(r"The area is \boxed{32}", by_id["math_002"].answer, by_id["math_002"].kind)


def test_selection_shuffles_then_offsets_then_limits(shared_data: Callable[[str], Path]) -> None:
    path = shared_data("gsm8k_test_1000.jsonl")
    everything = load_dataset(path, shuffle=True, seed=5)
    assert load_dataset(path, shuffle=True, seed=5, offset=10, limit=3) == everything[10:13]
    assert everything != load_dataset(path)
    assert sorted(p.id for p in everything) == sorted(p.id for p in load_dataset(path))
    assert load_dataset(path, shuffle=True, seed=6)[:5] != everything[:5]
    assert load_dataset(path, offset=998) == load_dataset(path)[998:]


# --- formats ------------------------------------------------------------------


def test_math_aime_and_plain_formats(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}", "unique_id": "test/algebra/1.json"},
            {"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 2"},
            {"id": 2025, "problem": "AIME problem", "answer": 204},
            {"prompt": "Say hi."},
            {"prompt": "Pick one.", "answer": "B", "kind": "choice", "metadata": {"source": "mmlu"}},
            {"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
        ],
    )
    math, from_solution, aime, plain, choice, question = load_dataset(path)
    assert (math.id, math.answer, math.kind, math.line) == ("test/algebra/1.json", "\\frac{3}{4}", "math", 1)
    assert (from_solution.id, from_solution.answer) == ("mixed-2", "\\frac{1}{2}")
    assert from_solution.metadata == {"solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 2"}
    assert (aime.id, aime.answer) == ("2025", "204")
    assert (plain.id, plain.answer, plain.kind) == ("mixed-4", None, "auto")
    assert (choice.kind, choice.metadata) == ("choice", {"source": "mmlu"})
    assert (question.answer, question.kind) == ("Shakespeare", "auto")


def test_training_layout_and_multi_turn_messages(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]},
    ]
    path = write_lines(
        tmp_path / "train.jsonl",
        [{"conversation": conversation, "responses": ["6", "7"], "ground_truth": "6"}],
    )
    (problem,) = load_dataset(path)
    assert problem.messages == conversation
    assert problem.text == "and 3+3?"
    assert problem.answer == "6"
    assert problem.metadata == {"responses": ["6", "7"]}


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert [(p.id, p.line) for p in load_dataset(path)] == [("gaps-2", 2), ("gaps-4", 4)]


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"question": "b", "answer": "x\n#### 1,500"}]))
    first, second = load_dataset(path)
    assert (first.id, first.answer) == ("list-1", "1")
    assert (second.id, second.answer, second.kind) == ("list-2", "1500", "gsm8k")


# --- errors name the file and line ---------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', '{"a": 1, "b": 2}'], r"^data\.jsonl:2: unknown record shape \(keys: a, b\); expected"),
        (['{"prompt": "ok"}', "{not json"], r"^data\.jsonl:2: invalid JSON: "),
        (['{"id": "x", "prompt": "a"}', '{"prompt": "b"}', '{"id": "x", "prompt": "c"}'],
         r"^data\.jsonl:3: duplicate id 'x' \(first at data\.jsonl:1\)"),
        (['{"prompt": "a"}', '{"id": "data-1", "prompt": "b"}'], r"^data\.jsonl:2: duplicate id 'data-1'"),
        (['[1, 2]'], r"^data\.jsonl:1: expected a JSON object, got list"),
        (['{"prompt": ""}'], r"^data\.jsonl:1: 'prompt' must be non-empty text"),
        (['{"prompt": "a", "answer": [1]}'], r"^data\.jsonl:1: the answer must be text or a number"),
        (['{"prompt": "a", "kind": "fuzzy"}'], r"^data\.jsonl:1: unknown grading kind 'fuzzy'"),
        (['{"messages": [{"role": "assistant", "content": "hi"}]}'], r"^data\.jsonl:1: 'messages': .*no user message"),
        (['{"messages": [{"content": "hi"}]}'], r"^data\.jsonl:1: 'messages' item 0 is not a chat message"),
        (['{"messages": "hi"}'], r"^data\.jsonl:1: 'messages' must be a list"),
        (['{"id": {"a": 1}, "prompt": "a"}'], r"^data\.jsonl:1: the id must be text or a whole number"),
    ],
)  # fmt: skip
def test_bad_records_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data set file not found: .*missing.jsonl"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="is a directory"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"\n  \n", r"empty\.jsonl: the file holds no problems"),
        ("latin.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', r"^latin\.jsonl:2: not valid UTF-8"),
        ("obj.json", b'{"prompt": "a"}', r"^obj\.json: a \.json data set must hold a list"),
        ("items.json", b'[{"prompt": "a"}, {"nope": 1}]', r"^items\.json: item 2: unknown record shape"),
        ("broken.json", b'[{"prompt": "a"},\n {"prompt": }]', r"^broken\.json:2: invalid JSON"),
    ],
)
def test_file_level_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_selection_arguments_are_checked(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "two.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match="offset 2 is past the end \\(2 problems\\)"):
        load_dataset(path, offset=2)
    with pytest.raises(UsageError, match="limit must be at least 1"):
        load_dataset(path, limit=0)
    with pytest.raises(UsageError, match="offset must be 0 or more"):
        load_dataset(path, offset=-1)
    assert [p.id for p in load_dataset(path, limit=5)] == ["two-1", "two-2"]


# Arbitrary JSON values, including deep nesting and the shapes the reader knows.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
known_keys = st.sampled_from(
    ["messages", "conversation", "ground_truth", "question", "problem", "prompt", "answer", "solution",
     "id", "unique_id", "kind", "metadata", "role", "content", "type", "text"]
)  # fmt: skip
text_or_any = st.text(max_size=8) | json_values
chat_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot"])},
        optional={"content": text_or_any | st.lists(st.dictionaries(st.sampled_from(["type", "text"]), text_or_any))},
    ),
    max_size=3,
)
chat_records = st.fixed_dictionaries(
    {"messages": chat_messages}, optional={"ground_truth": json_values | st.fixed_dictionaries({"answer": text_or_any})}
)
simple_records = st.sampled_from(["prompt", "question", "problem"]).flatmap(
    lambda key: st.fixed_dictionaries(
        {key: text_or_any},
        optional={"answer": text_or_any, "id": text_or_any, "kind": st.sampled_from(["auto", "math", "bogus"])},
    )
)
records = st.dictionaries(known_keys, json_values, max_size=5) | chat_records | simple_records | json_values
lines = st.lists(
    records.map(json.dumps) | st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s),
    min_size=0,
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines)
def test_reader_only_raises_dataset_errors(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            problems = load_dataset(path)
        except DatasetError as exc:
            assert str(exc).startswith(("fuzz.jsonl", str(path)))
            return
        for problem in problems:
            assert problem.id and problem.text is not None
            assert problem.answer is None or problem.answer.strip()


# Raw bytes: invalid UTF-8, byte order marks, NULs, stray brackets around the known shapes.
raw_files = st.lists(
    st.binary(max_size=40)
    | st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"[", b"]", b","])
    | lines.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    max_size=4,
).map(b"".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=raw_files, suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_bytes_give_problems_or_one_dataset_error(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"raw{suffix}"
        path.write_bytes(content)
        try:
            problems = load_dataset(path)
        except DatasetError as exc:
            assert str(exc).startswith((f"raw{suffix}", str(path))) and "\n" not in str(exc)
            return
        assert problems and all(problem.id for problem in problems)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(records, max_size=5))
def test_json_list_files_only_raise_dataset_errors(items: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "list.json"
        path.write_text(json.dumps(items), encoding="utf-8", errors="surrogatepass")
        try:
            problems = load_dataset(path)
        except DatasetError as exc:
            assert str(exc).startswith(("list.json", str(path)))
            return
        assert len(problems) == len(items)


# --- fingerprints ----------------------------------------------------------------


def test_fingerprint_tracks_content_not_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "fp.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}])
    problems = load_dataset(path)
    fingerprint = dataset_fingerprint(problems)
    assert len(fingerprint) == 64
    assert dataset_fingerprint(list(reversed(problems))) == fingerprint
    assert dataset_fingerprint(load_dataset(path)) == fingerprint
    changed = write_lines(tmp_path / "fp.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 3}])
    assert dataset_fingerprint(load_dataset(changed)) != fingerprint
    assert dataset_fingerprint(problems[:1]) != fingerprint


# --- synthetic problems -----------------------------------------------------------------


def test_synthetic_answers_are_exact() -> None:
    problems = synthetic_problems(40, seed=3)
    assert [p.metadata["operation"] for p in problems[:4]] == ["add", "sub", "mul", "modexp"]
    assert len({p.id for p in problems}) == 40
    for problem in problems:
        operands = problem.metadata["operands"]
        assert all(10**10 <= n < 10**13 for n in operands)
        assert all(str(n) in problem.text for n in operands)
        a, b, *rest = operands
        expected = {
            "add": lambda a=a, b=b: a + b,
            "sub": lambda a=a, b=b: a - b,
            "mul": lambda a=a, b=b: a * b,
            "modexp": lambda a=a, b=b, rest=rest: pow(a, b, rest[0]),
        }[problem.metadata["operation"]]()
        assert problem.answer == str(expected)
        assert problem.kind == "number"
        assert grade(rf"\boxed{{{expected}}}", problem.answer, problem.kind)
        assert not grade(rf"\boxed{{{expected + 1}}}", problem.answer, problem.kind)


def test_synthetic_problems_are_reproducible_and_configurable() -> None:
    assert synthetic_problems(5, seed=1) == synthetic_problems(5, seed=1)
    assert synthetic_problems(5, seed=1) != synthetic_problems(5, seed=2)
    short = synthetic_problems(6, digits=(3, 3), operations=["mul"], seed=0)
    assert all(p.metadata["operation"] == "mul" for p in short)
    assert all(len(str(n)) == 3 for p in short for n in p.metadata["operands"])
    with pytest.raises(UsageError, match="unknown operations"):
        synthetic_problems(2, operations=["pow"])
    with pytest.raises(UsageError, match="digits"):
        synthetic_problems(2, digits=(5, 3))
    with pytest.raises(UsageError, match="count"):
        synthetic_problems(0)


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    problems = synthetic_problems(7, seed=4)
    chat = Problem(
        id="chat", messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], answer="1"
    )
    path = tmp_path / "out.jsonl"
    assert write_jsonl([*problems, chat], path) == 8
    loaded = load_dataset(path)
    assert [p.model_copy(update={"line": 0}) for p in loaded] == [*problems, chat]


# --- the `pacore data` commands ---------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from pacore.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_data_synth_and_check_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth.jsonl"
    code, stdout, _ = run_cli(capsys, "data", "synth", "--count", "6", "--digits", "4-5", "--ops", "mul,modexp",
                              "--seed", "2", "--out", str(out))  # fmt: skip
    assert (code, stdout.strip()) == (0, f"wrote 6 problems to {out}")
    problems = load_dataset(out)
    assert [p.metadata["operation"] for p in problems] == ["mul", "modexp"] * 3
    assert all(4 <= len(str(n)) <= 5 for p in problems for n in p.metadata["operands"])

    code, stdout, _ = run_cli(capsys, "data", "check", str(out), "--json")
    assert code == 0
    assert json.loads(stdout) == {
        "problems": 6, "with_answer": 6, "kinds": {"number": 6}, "fingerprint": dataset_fingerprint(problems)
    }  # fmt: skip


def test_data_commands_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"a": 1}])
    code, _, stderr = run_cli(capsys, "data", "check", str(bad))
    assert code == 2
    assert stderr.startswith("pacore: error: bad.jsonl:2: unknown record shape (keys: a)")
    assert stderr.count("\n") == 1
    code, _, stderr = run_cli(capsys, "data", "synth", "--digits", "eleven", "--out", str(tmp_path / "x.jsonl"))
    assert (code, stderr) == (2, "pacore: error: --digits must look like 11-13 or 12, got 'eleven'\n")


def test_an_unknown_record_shape_names_its_keys_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"a\nb": 1, "c": 2}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert "\n" not in str(caught.value) and "'a\\nb', c" in str(caught.value)
