"""Sharded evaluation under `torchrun` (gloo, CPU) with a tiny random model on real tasks: the
2-rank record equals the 1-process one, and a killed 2-rank run resumes in one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_dpr import save_tiny_dpr
from test_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMPARED = ("metrics", "stderr", "totals", "method_stats", "n_examples", "config")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder and one cache shared by the module's runs."""
    folder = tmp_path_factory.mktemp("distributed")
    save_tiny_model(folder / "tiny", seed=0)
    return folder, {**os.environ, "PYTHONPATH": str(ROOT), "RAGHUB_CACHE": str(folder / "cache")}


def raghub(ranks, results, env, *args, **popen):
    """`python -m raghub run ...` in one process, or under `torchrun` with `ranks` processes."""
    launcher = ([str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1
                else [sys.executable])
    folder, variables = env
    command = [*launcher, "-m", "raghub", "run", "--model", str(folder / "tiny"), "--json",
               "--results-dir", str(folder / results), *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=variables, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **popen)
    done = subprocess.run(command, env=variables, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def samples(env, results, record):
    return (env[0] / results / record["samples"]).read_text()


def test_two_ranks_give_the_one_process_records(env):
    sweep = ("--task", "wikitext2,squad", "--method", "none,incontext", "--n-docs", 2, "--limit", 4,
             "--batch-size", 2)
    single, sharded = raghub(1, "one", env, *sweep), raghub(2, "two", env, *sweep)
    assert [(r["task"], r["method"]) for r in sharded] == [(r["task"], r["method"]) for r in single] == [
        ("wikitext2", "none"), ("wikitext2", "incontext"), ("squad", "none"), ("squad", "incontext")]
    for one, two in zip(single, sharded):
        assert {key: two[key] for key in COMPARED} == {key: one[key] for key in COMPARED}
        assert samples(env, "two", two) == samples(env, "one", one)
    assert len((env[0] / "two" / "records.jsonl").read_text().splitlines()) == 4  # rank 0 alone wrote
    assert not any((env[0] / "two" / ".partial").iterdir())  # every rank's resume file merged away


def test_two_ranks_share_the_passage_embedding_and_give_the_one_process_record(env, tmp_path):
    """Dense indexing under torchrun: each rank embeds every other shard of SQuAD's 2,067
    paragraphs (tiny random DPR towers), rank 0 assembles them; the record equals one
    process's, which embedded all of them itself (separate caches)."""
    question, context = save_tiny_dpr(tmp_path / "dpr")
    run = ("--task", "squad", "--method", "incontext", "--retriever", "dpr", "--encoder", question,
           "--passage-encoder", context, "--embed-shard-size", 300, "--n-docs", 2, "--limit", 4)
    records = []
    for ranks in (1, 2):
        own_cache = (env[0], {**env[1], "RAGHUB_CACHE": str(tmp_path / f"cache{ranks}")})
        [record] = raghub(ranks, f"dpr{ranks}", own_cache, *run)
        records.append(record)
        assert not list((tmp_path / f"cache{ranks}").glob("dpr-embeddings/*.shards"))  # assembled, then removed
    assert {key: records[1][key] for key in COMPARED} == {key: records[0][key] for key in COMPARED}
    assert records[0]["metrics"]["recall@2"] == records[1]["metrics"]["recall@2"]


def test_a_killed_two_rank_run_resumes_in_one_process(env):
    run = ("--task", "squad", "--method", "incontext", "--n-docs", 2, "--limit", 8, "--batch-size", 1)
    [whole] = raghub(1, "whole", env, *run)
    killed = raghub(2, "killed", env, *run, start_new_session=True)
    partial = env[0] / "killed" / ".partial"
    deadline = time.monotonic() + 90
    while not any(path.stat().st_size for path in partial.glob("*.rank*.jsonl")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no example reached a rank's resume file"
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both ranks
    killed.wait()
    finished = sum(path.read_text().count("\n") for path in partial.glob("*.jsonl"))
    assert 1 <= finished < 8, "the kill did not come mid-run"
    [resumed] = raghub(1, "killed", env, *run)
    assert {key: resumed[key] for key in COMPARED} == {key: whole[key] for key in COMPARED}
    assert samples(env, "killed", resumed) == samples(env, "whole", whole)
    assert not any(partial.iterdir())


def test_each_rank_takes_every_other_single_process_batch_and_its_own_resume_file(monkeypatch, tmp_path):
    from raghub import distributed

    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(rank=1, world_size=2, local_rank=1))
    assert distributed.my_batches(list(range(7)), 2) == [[2, 3], [6]]
    shared = tmp_path / "fp.jsonl"
    assert distributed.my_resume_file(shared) == tmp_path / "fp.rank1.jsonl"
    for name in ("fp.rank0.jsonl", "fp.rank3.jsonl", "other.rank0.jsonl"):
        (tmp_path / name).touch()
    assert distributed.resume_files(shared) == [shared, tmp_path / "fp.rank0.jsonl", tmp_path / "fp.rank3.jsonl"]


@pytest.mark.parametrize("asked, expected", [(None, "nccl"), ("gloo", "gloo")])
def test_ranks_joins_nccl_beside_a_gpu_unless_a_backend_is_asked_for(monkeypatch, asked, expected):
    import torch
    import torch.distributed as dist

    from raghub import distributed

    joined, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", joined.append)
    distributed.ranks.cache_clear()
    try:
        assert distributed.ranks(asked) == distributed.Ranks(rank=1, world_size=2, local_rank=1)
        assert distributed.ranks() == distributed.Ranks(rank=1, world_size=2, local_rank=1)
    finally:
        distributed.ranks.cache_clear()
    assert joined == [expected]
    assert devices == ([1] if expected == "nccl" else [])


def test_two_ranks_retrieving_different_numbers_of_times_give_the_one_process_record(env):
    """A method's own retrieval calls are rank-local: of three one-question batches rank 0 runs
    two and rank 1 one, so rank 0 calls `retrieve` twice as often (`--threshold 1`: every
    closed-book answer is unsure); a collective inside `retrieve` would hang rank 0."""
    run = ("--task", "hotpotqa", "--method", "adaptive", "--threshold", 1, "--n-docs", 2, "--limit", 3,
           "--batch-size", 1)
    [single], [sharded] = raghub(1, "adaptive1", env, *run), raghub(2, "adaptive2", env, *run)
    assert {key: sharded[key] for key in COMPARED} == {key: single[key] for key in COMPARED}
    assert samples(env, "adaptive2", sharded) == samples(env, "adaptive1", single)
    assert single["method_stats"]["retrieval_calls_per_example"] == 1
    lines = [json.loads(line) for line in samples(env, "adaptive1", single).splitlines()]
    assert all(line["retrievals"][0]["query"] == line["question"] for line in lines)


def test_a_killed_run_of_a_method_that_retrieves_while_it_works_resumes_to_the_same_samples(env):
    run = ("--task", "hotpotqa", "--method", "iter-retgen", "--iterations", 2, "--n-docs", 2, "--limit", 6,
           "--batch-size", 1)
    [whole] = raghub(1, "iter-whole", env, *run)
    killed = raghub(1, "iter-killed", env, *run, start_new_session=True)
    partial = env[0] / "iter-killed" / ".partial"
    deadline = time.monotonic() + 90
    while not any(path.stat().st_size for path in partial.glob("*.jsonl")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no example reached the resume file"
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = sum(path.read_text().count("\n") for path in partial.glob("*.jsonl"))
    assert 1 <= finished < 6, "the kill did not come mid-run"
    [resumed] = raghub(1, "iter-killed", env, *run)
    assert {key: resumed[key] for key in COMPARED} == {key: whole[key] for key in COMPARED}
    assert samples(env, "iter-killed", resumed) == samples(env, "iter-whole", whole)
    assert whole["method_stats"]["retrieval_calls_per_example"] == 1
