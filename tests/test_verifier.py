"""The process verifier over real loopback HTTP: verdicts, its template, its cache, and the process reward."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path

import pytest

from cli_harness import pacore_in_process
from fakes import Call, ScriptedBackend
from judge_server import judge_server
from pacore.backends import GenerationParams
from pacore.errors import TemplateError, UsageError
from pacore.eval.datasets import Problem
from pacore.eval.runner import Arm, run_dataset
from pacore.rewards import compute_score, make_reward_func, process_rewards
from pacore.verifier import Judgement, VerdictCache, Verifier, VerifierTemplate, parse_verdict

pytestmark = pytest.mark.http


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Looks fine.\nVERDICT: VALID", True),
        ("VERDICT: INVALID", False),
        ("**VERDICT: VALID**", True),
        ("verdict = invalid.", False),
        ("First I thought VERDICT: INVALID, but on reflection\nVERDICT: VALID", True),
        ("<think>VERDICT: VALID</think>The derivation skips a case. VERDICT: INVALID", False),
        ("<think>VERDICT: VALID</think>No final line.", None),  # reasoning does not count
        ("The solution is valid.", None),
        ("VERDICT: VALIDATED", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(text: str | None, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


def test_templates_are_checked_and_sandboxed(tmp_path: Path) -> None:
    default = VerifierTemplate.load(None)
    prompt = default.render("What is 2+3?", "2+3=5, so 5.", "5")
    assert "What is 2+3?" in prompt and "2+3=5, so 5." in prompt and "VERDICT: VALID" in prompt
    unknown = tmp_path / "unknown.j2"
    unknown.write_text("Judge {{ solution }}")
    with pytest.raises(TemplateError, match="unknown.j2"):
        VerifierTemplate.load(unknown)
    escape = tmp_path / "escape.j2"
    escape.write_text("{{ problem.__class__.__mro__[1].__subclasses__() }} {{ response }} {{ ground_truth }}")
    with pytest.raises(TemplateError):
        VerifierTemplate.load(escape)
    with pytest.raises(TemplateError, match="cannot read verifier template .*missing.j2: No such file"):
        VerifierTemplate.load(tmp_path / "missing.j2")
    with pytest.raises(TemplateError, match="cannot read verifier template .*: not a regular file"):
        VerifierTemplate.load(tmp_path)  # read with the synthesis template's bounded reader
    loader = tmp_path / "loader.j2"
    loader.write_text("{% include '/etc/passwd' %}{{ problem }}{{ response }}{{ ground_truth }}")
    with pytest.raises(TemplateError, match="not allowed"):
        VerifierTemplate.load(loader)


def test_verdicts_over_http_are_cached_by_content(tmp_path: Path) -> None:
    cache = tmp_path / "verdicts.sqlite"
    items = [
        Judgement("What is 2+3?", "2+3=5, so the answer is 5.", "5"),
        Judgement("What is 2+3?", "I guess 5.", "5"),
        Judgement("What is 2+3?", "garble garble 5", "5"),
        Judgement("What is 2+3?", "2+3=5, so the answer is 5.", "5"),  # the same item again
    ]
    with judge_server() as judge:
        with Verifier(judge.url, cache=cache) as verifier:
            assert verifier.verify_many(items) == [True, False, None, True]
            assert len(judge.prompts) == 3  # the repeated item cost no second call
            assert (verifier.stats.calls, verifier.stats.unknown) == (3, 1)
        assert len(VerdictCache(cache)) == 2  # an unreadable judgement is not cached
        # A new verifier (another process, a re-run report) reads the cache: only the unknown one is asked again.
        with Verifier(judge.url, cache=cache) as again:
            assert again.verify_many(items) == [True, False, None, True]
            assert (again.stats.cache_hits, again.stats.calls) == (2, 1)  # distinct items: 2 cached, 1 asked
        assert len(judge.prompts) == 4
        # Another template is another judge: nothing is reused.
        custom = tmp_path / "strict.j2"
        custom.write_text("STRICT CHECK of {{ problem }} -> {{ ground_truth }}\nSolution to check:\n{{ response }}")
        with Verifier(judge.url, cache=cache, template=custom) as strict:
            assert strict.verify("What is 2+3?", "I guess 5.", "5") is False
            assert strict.stats.calls == 1
        assert judge.prompts[-1] == "STRICT CHECK of What is 2+3? -> 5\nSolution to check:\nI guess 5."


def test_process_reward_needs_a_right_answer_and_a_valid_derivation(tmp_path: Path) -> None:
    with judge_server() as judge, Verifier(judge.url, cache=False) as verifier:
        rewards = process_rewards(
            ["What is 2+3?"] * 4,
            [
                "2+3=5. The answer is 5.",
                "I guess the answer is 5.",
                "2+3=6. The answer is 6.",
                "garble: the answer is 5",
            ],
            ["5"] * 4,
            ["number"] * 4,
            verifier,
        )
        assert rewards == [1.0, 0.0, 0.0, None]
        assert len(judge.prompts) == 3  # the wrong answer was never sent to the verifier


def test_compute_score_with_a_verifier_as_verl_calls_it(tmp_path: Path) -> None:
    # verl merges custom_reward_function.reward_kwargs into the keywords of each call.
    params = inspect.signature(compute_score).parameters
    assert list(params)[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    extra = {"kind": "number", "problem": "What is 2+3?", "index": 0}
    cache = str(tmp_path / "v.sqlite")
    with judge_server() as judge:
        call = {"verifier": judge.url, "verifier_cache": cache}
        assert (
            compute_score(
                data_source="pacore/t", solution_str="2+3=5. Answer: 5", ground_truth="5", extra_info=extra, **call
            )
            == 1.0
        )
        assert (
            compute_score(
                data_source="pacore/t", solution_str="I guess. Answer: 5", ground_truth="5", extra_info=extra, **call
            )
            == 0.0
        )
        assert (
            compute_score(
                data_source="pacore/t", solution_str="garble. Answer: 5", ground_truth="5", extra_info=extra, **call
            )
            == 0.0
        )
        # Without the verifier keyword it is the outcome reward: a guess that is right scores.
        assert compute_score("pacore/t", "I guess. Answer: 5", "5", extra) == 1.0
        with pytest.raises(UsageError, match="extra_info\\['problem'\\]"):
            compute_score("pacore/t", "Answer: 5", "5", {"kind": "number"}, **call)


def test_trl_process_reward_function(tmp_path: Path) -> None:
    with judge_server() as judge:
        reward = make_reward_func("process", verifier=judge.url, verifier_cache=tmp_path / "v.sqlite")
        assert reward.__name__ == "process_reward"  # TRL logs it as rewards/process_reward
        completions = [
            [{"role": "assistant", "content": "<think>hmm</think>2+3=5, so \\boxed{5}"}],
            [{"role": "assistant", "content": "I guess \\boxed{5}"}],
            [{"role": "assistant", "content": "\\boxed{4}"}],
        ]
        prompts = [[{"role": "user", "content": "synthesis prompt with references"}]] * 3
        rewards = reward(
            prompts=prompts, completions=completions, ground_truth=["5", "5", "5"], kind=["number"] * 3,
            problem=["What is 2+3?"] * 3, completion_ids=[[1], [2], [3]],
        )  # fmt: skip
        assert rewards == [1.0, 0.0, 0.0]
        # The verifier judged the compacted answer against the original problem, not the synthesis prompt.
        assert "What is 2+3?" in judge.prompts[0] and "hmm" not in judge.prompts[0]
    with pytest.raises(UsageError, match="needs a verifier"):
        make_reward_func("process")
    with pytest.raises(UsageError, match="unknown reward"):
        make_reward_func("prm")  # type: ignore[arg-type]


def _reply(call: Call, i: int) -> str:
    # q0: a derivation; q1: a lucky guess; q2: wrong.
    n = int(call.last_user_text.split("Problem ")[1].split(":")[0])
    return {0: "0+1=1, so the answer is 1", 1: "I guess the answer is 2", 2: "The answer is 9"}[n]


def test_report_shows_spurious_correctness_per_arm(tmp_path: Path) -> None:
    problems = [
        Problem(
            id=f"q{n}",
            messages=[{"role": "user", "content": f"Problem {n}: what is {n} plus one?"}],
            answer=str(n + 1),
            kind="number",
        )  # fmt: skip
        for n in range(3)
    ]
    asyncio.run(
        run_dataset(
            tmp_path / "run",
            problems,
            dataset_path="d.jsonl",
            arm=Arm.build("single"),
            backend=ScriptedBackend(respond=_reply),
        )  # fmt: skip
    )
    with judge_server() as judge:
        command = ["report", str(tmp_path / "run"), "--json", "--verifier", judge.url]
        env = {"PACORE_CACHE_DIR": str(tmp_path / "cache")}
        process = pacore_in_process(*command, env=env)
        assert process.returncode == 0, process.stderr
        (arm,) = json.loads(process.stdout)["methods"]
        assert arm["correct"] == 2
        assert arm["spurious"] == {"judged": 2, "rejected": 1, "unknown": 0, "spurious_correctness": 0.5}
        assert len(judge.prompts) == 2  # only correct answers are judged
        markdown = (tmp_path / "run" / "report.md").read_text()
        assert "## Spurious correctness" in markdown and "1/2 (50.0%)" in markdown
        # Re-running the report asks nothing: the verdicts are cached.
        assert pacore_in_process(*command, env=env).returncode == 0
        assert len(judge.prompts) == 2
    plain = pacore_in_process("report", str(tmp_path / "run"), "--json")
    assert json.loads(plain.stdout)["methods"][0]["spurious"] is None
    assert "Spurious" not in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.model
def test_the_embedded_model_as_a_verifier_over_http(llama_server_url: str, tmp_path: Path) -> None:
    """The real llama.cpp server judges; whatever it says, a definite verdict is cached and reused."""
    items = [Judgement("What is 2+3?", "2+3=5, so the answer is 5.", "5"), Judgement("What is 2+3?", "I guess 5.", "5")]
    cache = tmp_path / "v.sqlite"
    with Verifier(llama_server_url, cache=cache, params=GenerationParams(temperature=0.0, max_tokens=96)) as verifier:
        first = verifier.verify_many(items)
        assert verifier.stats.calls == 2 and all(v in (True, False, None) for v in first)
    with Verifier(llama_server_url, cache=cache, params=GenerationParams(temperature=0.0, max_tokens=96)) as again:
        second = again.verify_many(items)
        assert [s for s, f in zip(second, first, strict=True) if f is not None] == [f for f in first if f is not None]
        definite = sum(v is not None for v in first)
        assert (again.stats.cache_hits, again.stats.calls) == (definite, 2 - definite)
