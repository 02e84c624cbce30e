"""planner/runtime/launch.py: the torchrun launcher's reading of a failed job (no torchrun is started),
the position file a rank keeps, the injected failures of the tests. No torch needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from planner.runtime import InjectedFailure
from planner.runtime.launch import Position, replay_failure, run_torchrun


def _fake_torchrun(tmp_path: Path, stderr_text: str, code: int) -> list[str]:
    script = tmp_path / "fake_torchrun.py"
    script.write_text(f"import sys\nsys.stderr.write({stderr_text!r})\nsys.exit({code})\n")
    return [sys.executable, str(script)]


def launcher_report(others: list[tuple[int, int]], root: tuple[int, int]) -> str:
    """torchrun's stderr after a worker failed (torch 2.x format): log lines, its traceback, and the
    summary of (global rank, exit code) failures, the first observed last."""
    def entry(i: int, rank: int, code: int) -> str:
        return (f"[{i}]:\n  time      : 2026-12-02_17:22:36\n  host      : localhost\n"
                f"  rank      : {rank} (local_rank: {rank % 4})\n  exitcode  : {code} (pid: {25690 + rank})\n")
    return ("step 0 (plan step 0): loss 5.5\n"
            "W1202 17:22:36.604000 25580 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] "
            "Sending process 25692 closing signal SIGTERM\n"
            "E1202 17:22:36.827000 25580 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] "
            f"failed (exitcode: {root[1]}) local_rank: {root[0] % 4} (pid: 25694) of binary: python\n"
            "Traceback (most recent call last):\n  File \"run.py\", line 1028, in main\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + "=" * 60 + "\nFailures:\n"
            + "".join(entry(i + 1, r, c) for i, (r, c) in enumerate(others)) + "-" * 60
            + "\nRoot Cause (first observed failure):\n" + entry(0, *root) + "=" * 60 + "\n")


LAUNCHER_REPORT = launcher_report([(0, -15)], (7, -9))


def test_launcher_report_is_parsed_not_printed(tmp_path, capfd):
    """torchrun's traceback and summary are swallowed; its root cause (global rank, signal) and the
    position the rank kept in the status folder make the line (no torchrun is started)."""
    launch = run_torchrun(_fake_torchrun(tmp_path, LAUNCHER_REPORT, 1), dict(os.environ))
    err = capfd.readouterr().err
    assert err == "step 0 (plan step 0): loss 5.5\n"  # the ranks' progress passes, the launcher's report does not
    assert (launch.returncode, launch.failures, launch.dead(), launch.root) == (1, ((0, -15), (7, -9)), (7, -9), None)
    (tmp_path / "rank7").write_text("step 3 (plan step 1) unit 12 (HDP ranks [6, 7])")
    assert replay_failure(launch, tmp_path).startswith(
        "rank 7 was killed by SIGKILL in step 3 (plan step 1) unit 12 (HDP ranks [6, 7])")
    assert replay_failure(launch, tmp_path / "elsewhere").startswith("rank 7 was killed by SIGKILL (")  # not local
    # torchrun may observe a survivor first (stopped by its peer's death, exit code 1): the killed rank is blamed
    launch = run_torchrun(_fake_torchrun(tmp_path, launcher_report([(7, -9)], (6, 1)), 1), dict(os.environ))
    assert launch.failures == ((7, -9), (6, 1)) and launch.dead() == (7, -9)
    assert replay_failure(launch, tmp_path).startswith("rank 7 was killed by SIGKILL in step 3")


def test_rank_errors_win_and_stopped_peers_are_quiet(tmp_path, capfd):
    text = ("error: rank 1 (HDP rank 1) stopped (a peer rank failed first) in step 0 unit 2: RuntimeError: reset\n"
            "error: rank 2 (HDP rank 2) failed in step 0 (plan step 0) unit 2 (HDP ranks [1, 2]): RuntimeError: x\n"
            + LAUNCHER_REPORT)
    launch = run_torchrun(_fake_torchrun(tmp_path, text, 1), dict(os.environ))
    assert capfd.readouterr().err.splitlines() == [text.splitlines()[1]]
    assert replay_failure(launch, tmp_path).startswith("rank 2 (HDP rank 2) failed in step 0 (plan step 0) unit 2")
    only_stopped = run_torchrun(_fake_torchrun(tmp_path, text.splitlines()[0] + "\n", 1), dict(os.environ))
    assert replay_failure(only_stopped, tmp_path).startswith("rank 1 (HDP rank 1) stopped")


def test_position_file_holds_the_latest_place(tmp_path):
    pos = Position(tmp_path, 5)
    assert (tmp_path / "rank5").read_text() == "start-up"
    pos.set("step 0 (plan step 0) unit 12 (HDP ranks [0, 1, 2, 3])")
    pos.set("step 0 (plan step 0) gradient all-reduce")  # shorter: no tail of the previous text left
    assert (tmp_path / "rank5").read_text() == pos.text == "step 0 (plan step 0) gradient all-reduce"


def test_injected_failure_parses_and_fires_only_on_its_rank_and_unit():
    f = InjectedFailure.parse("2:5")
    assert f == InjectedFailure(2, 5) and InjectedFailure.parse("0:1:kill") == InjectedFailure(0, 1, kill=True)
    assert [str(x) for x in (f, InjectedFailure(0, 1, kill=True))] == ["2:5", "0:1:kill"]  # what ranks are passed
    f.fire(2, 4)
    f.fire(1, 5)
    with pytest.raises(RuntimeError, match="injected failure"):
        f.fire(2, 5)
    for bad in ("2", "a:1", "1:2:boom", "1:2:kill:x"):
        with pytest.raises(ValueError, match="RANK:UNIT"):
            InjectedFailure.parse(bad)


def test_the_replay_runs_the_context_parallelism_the_plan_was_priced_with():
    """--cp defaults to the plan's meta.training.cp (ring for hand-built plans); --cp overrides it."""
    from planner.plan import Mesh, Plan, PlanError
    from planner.runtime.launch import replay_cp

    def plan(meta):
        return Plan(meta=meta, mesh=Mesh(world_size=1, tp=1, pp=1, hdp=1), steps=[])

    assert replay_cp(plan({"training": {"cp": "allgather"}}), None) == "allgather"
    assert replay_cp(plan({"training": {"cp": "allgather"}}), "ring") == "ring"
    assert replay_cp(plan({}), None) == "ring"
    with pytest.raises(PlanError, match="context-parallel implementation"):
        replay_cp(plan({"training": {"cp": "ulysses"}}), None)


def test_a_plan_priced_with_what_the_replay_does_not_run_is_told_apart():
    """The replay warns when the plan's predicted times assume Megatron's fused kernels (it runs eager ops) or,
    with TP, sequence parallelism (it runs TP without), each with the flag that prices what runs."""
    from planner.plan import Mesh, Plan
    from planner.runtime.launch import pricing_differences

    def plan(meta, tp=1):
        return Plan(meta=meta, mesh=Mesh(world_size=tp, tp=tp, pp=1, hdp=1), steps=[])

    assert [d.split(": ")[-1] for d in pricing_differences(plan({"training": {"dtype": "bf16"}}))] == [
        "plan with --kernels eager"]  # `meshplan plan` without --kernels
    assert pricing_differences(plan({"training": {"kernels": "eager"}})) == []
    assert pricing_differences(plan({"training": {"kernels": "eager", "sequence_parallel": True}})) == []  # tp 1
    sp = pricing_differences(plan({"training": {"kernels": "eager"}}, tp=2))  # SP is TrainingSpec's default
    assert [d.split(": ")[-1] for d in sp] == ["plan with --no-sequence-parallel"]
    assert pricing_differences(plan({"training": {"kernels": "eager", "sequence_parallel": False}}, tp=2)) == []
    assert pricing_differences(plan({}, tp=2)) == []  # hand-built: nothing priced


@pytest.mark.parametrize("given", [None, "3"])
def test_ranks_get_one_thread_unless_the_environment_says(tmp_path, monkeypatch, given):
    """A CPU rank computes on one thread, as the CPU profile times its tables (a replay runs what was priced);
    OMP_NUM_THREADS in the caller's environment wins. No torchrun is started."""
    from planner.api import PlanRequest, make_plan
    from planner.runtime import launch

    path = tmp_path / "p.json"
    make_plan(PlanRequest(model="tiny", cluster="local-cpu", gpus=1, lengths="lognormal:median=300,sigma=1.0,max=1024",
                          tokens_per_step=2048, max_context_tokens=1024, dtype="fp32", kernels="eager"),
              "static").save(path)
    seen = {}

    def fake(cmd, env):
        seen.update(env)
        return launch.Launch(0, None, None)

    monkeypatch.setattr(launch, "run_torchrun", fake)
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    launch.replay(launch.ReplayOptions(plan_path=path, device="cpu"), nproc=1)
    assert seen["OMP_NUM_THREADS"] == (given or "1")
