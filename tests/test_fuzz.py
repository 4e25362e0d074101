"""The fuzzer's CI budget: hypothesis picks sample models and mutation seeds (derandomized, so every run
checks the same mutants); each mutant goes through `info`, `optimize --check-data` and `check`, which must
exit 0/1/2 without a traceback or a hang, and write nothing on exit 2. The long run is bench/fuzz/run_fuzz.py."""

from __future__ import annotations

import _fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(
    max_examples=24,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(name=st.sampled_from(_fuzz.sample_model_names()), seed=st.integers(0, 2**32 - 1))
def test_mutated_models_exit_0_1_or_2_without_traceback(name, seed):
    applied, results = _fuzz.run_mutant(name, seed, timeout=120)
    problems = [f"{r.argv[0]}: {'; '.join(r.problems)}: {r.stderr_tail[-400:]}" for r in results if r.problems]
    assert not problems, f"{name} seed {seed} ({', '.join(applied)}):\n" + "\n".join(problems)


def test_mutations_are_seeded_and_every_mutator_runs():
    raw = (_fuzz.SAMPLES / "wine_ifloop" / "model.onnx").read_bytes()
    assert _fuzz.mutate(raw, 7) == _fuzz.mutate(raw, 7)
    assert _fuzz.mutate(raw, 7)[0] != _fuzz.mutate(raw, 8)[0]
    seen = set()
    for seed in range(300):
        seen.update(a.removeprefix("bytes_") for a in _fuzz.mutate(raw, seed)[1])
    assert seen == set(_fuzz.STRUCTURAL) | set(_fuzz.BYTES)


def test_the_runner_reports_a_hang_and_a_crash(monkeypatch, tmp_path):
    from onnxslim import cli

    monkeypatch.setattr(cli, "main", lambda argv: __import__("time").sleep(30))
    rc, _, seconds = _fuzz.run_cli(["info", "x"], timeout=1, workdir=tmp_path)
    assert rc is None and seconds < 10

    def boom(argv):
        raise RuntimeError("deliberate")

    monkeypatch.setattr(cli, "main", boom)
    rc, err, _ = _fuzz.run_cli(["info", "x"], timeout=30, workdir=tmp_path)
    assert rc == 99 and "Traceback (most recent call last)" in err and "deliberate" in err


def test_mutants_the_long_run_found():
    # bench/fuzz/run_fuzz.py, seeds 100000..100999: an empty ints attribute in an ML op (the input fails
    # onnx.checker) made graphsurgeon's export raise -> exit 3; now exit 2 naming the problem.
    for name, seed in (("sklearn_wine_tree", 100037), ("sklearn_cancer", 100515)):
        applied, results = _fuzz.run_mutant(name, seed, timeout=120)
        assert [r.problems for r in results] == [[], [], []], (name, seed, applied)
        assert results[1].rc == 2
