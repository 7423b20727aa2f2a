"""Progressive rollouts through real processes: a real ``zdproxy run``, real
aiohttp backends whose error rate and latency the test sets, keep-alive client
load, the admin API and ``zdproxy ctl``. Short analysis intervals (250-300 ms);
every wait polls a condition."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from support import async_wait_for
from support_control import READ_TOKEN, actl
from support_rollouts import Deployment, Load, deployment


def plan(*steps: tuple[int, str | None], **analysis: Any) -> dict[str, Any]:
    return {
        "to": "green",
        "steps": [{"weight": w, **({"pause": p} if p else {})} for w, p in steps],
        "analysis": {"interval": "300ms", "min_requests": 10, "max_error_rate": 0.05, **analysis},
    }


async def events(deploy: Deployment) -> list[dict[str, Any]]:
    return [e for e in await deploy.admin.events() if e["action"].startswith("rollout.")]


# ---- the four outcomes ---------------------------------------------------------------


async def test_a_canary_answering_30_percent_errors_is_rolled_back(tmp_path: Path) -> None:
    async with deployment(tmp_path) as deploy:
        deploy.set("green", error_rate=0.3)
        load = Load(deploy.proxy.url, workers=4).start()
        await async_wait_for(lambda: len(load.answers) > 200, 20, "traffic on blue")
        await deploy.start_rollout(plan((10, "30s"), (50, "30s"), (100, None)))
        rollout = await deploy.wait_phase("rolled_back", "succeeded", timeout=30)
        seen_back = time.monotonic()
        await async_wait_for(lambda: load.count("blue", seen_back) > 200, 20, "traffic after")
        await load.stop()

        assert rollout["phase"] == "rolled_back", rollout
        assert "error_rate" in rollout["reason"]
        assert rollout["weights"] == {"blue": 100, "green": 0}
        assert await deploy.weights() == {"blue": 100, "green": 0}
        # the verdict that failed carries its figures
        verdict = rollout["last_verdict"]
        assert verdict["result"] == "fail" and verdict["canary"]["requests"] >= 10
        assert verdict["canary"]["error_rate"] > 0.05
        # clients saw the canary's 500s (no retries of answered requests) and only those;
        # none for requests sent once the rollback was visible
        failed = load.failed()
        assert failed and {a.status for a in failed} == {500}
        assert {a.pool for a in failed} == {"green"}
        assert load.failed(since=seen_back) == []
        assert load.count("green", since=seen_back) == 0
        # bound: at most what 10 % of the traffic at 30 % errors gives, with room for
        # the sampling noise of a few hundred requests
        share = len(failed) / len(load.answers)
        print(f"failed share: {len(failed)}/{len(load.answers)} = {share:.2%}")
        assert share < 0.1 * 0.3 * 2
        kpis = rollout["kpis"]
        assert kpis["result"] == "rolled_back"
        history: dict[str, Any] = {}

        async def settled() -> bool:
            # the rollback time is known once green has nothing in flight
            answer = await deploy.admin.ok("GET", "/api/v1/rollouts")
            history.update(answer["rollouts"][0]["kpis"])
            return "rollback_seconds" in history

        await async_wait_for(settled, 10, "the rollback KPIs")
        assert history["rollback_seconds"] < 60
        assert history["canary_requests_while_failing"] >= verdict["canary"]["requests"]
        assert history["pools"]["green"]["errors"] == len(failed)
        actions = [e["action"] for e in await events(deploy)]
        assert actions[:2] == ["rollout.start", "rollout.step"]
        assert actions[-2:] == ["rollout.verdict", "rollout.rollback"]


async def test_a_healthy_canary_goes_to_100_with_no_failed_request_and_blue_drains(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path) as deploy:
        load = Load(deploy.proxy.url, workers=4).start()
        await async_wait_for(lambda: len(load.answers) > 100, 20, "traffic on blue")
        await deploy.start_rollout(
            plan((10, "1s"), (50, "1s"), (100, "600ms"), interval="250ms", min_requests=5)
        )
        rollout = await deploy.wait_phase("succeeded", "rolled_back", "aborted", timeout=60)
        assert rollout["phase"] == "succeeded", rollout

        async def blue_drained() -> bool:
            state = await deploy.admin.state()
            return {b["state"] for b in state["pools"]["blue"]["backends"]} == {"drained"}

        await async_wait_for(blue_drained, 20, "blue drained")
        after = time.monotonic()
        await async_wait_for(lambda: load.count("green", after) > 100, 20, "traffic after")
        await load.stop()
        assert load.failed() == []
        assert load.count("blue", after) == 0
        assert await deploy.weights() == {"blue": 0, "green": 100}
        steps = [e["after"]["green"] for e in await events(deploy) if e["action"] == "rollout.step"]
        assert steps == [10, 50, 100]
        history = await deploy.admin.ok("GET", "/api/v1/rollouts")
        assert history["success_rate"] == 1.0 and history["results"]["succeeded"] == 1
        kpis = history["rollouts"][0]["kpis"]
        assert kpis["pools"]["green"]["errors"] == 0 and kpis["pools"]["green"]["requests"] > 0


async def test_a_canary_200ms_slower_is_rolled_back_on_the_latency_gate(tmp_path: Path) -> None:
    async with deployment(tmp_path) as deploy:
        deploy.set("green", delay=0.2)
        load = Load(deploy.proxy.url, workers=6).start()
        await async_wait_for(lambda: len(load.answers) > 100, 20, "traffic on blue")
        await deploy.start_rollout(plan((30, "30s"), (100, None), min_requests=8))
        rollout = await deploy.wait_phase("rolled_back", "succeeded", timeout=40)
        await load.stop()
        assert rollout["phase"] == "rolled_back", rollout
        assert "latency_ratio" in rollout["reason"] and "error_rate" not in rollout["reason"]
        failed = {c["name"] for c in rollout["last_verdict"]["checks"] if c["result"] == "fail"}
        assert failed == {"latency_ratio"}
        assert rollout["last_verdict"]["canary"]["p99_ms"] > 150
        assert load.failed() == []


async def test_same_2_percent_errors_as_the_baseline_at_low_traffic_is_not_rolled_back(
    tmp_path: Path,
) -> None:
    """4 rollouts in a row (green, blue, green, blue: the target's drained backends
    come back by themselves) with both pools failing 2 % at about 100 requests a
    second: every one succeeds."""
    async with deployment(tmp_path) as deploy:
        deploy.set("blue", error_rate=0.02)
        deploy.set("green", error_rate=0.02)
        load = Load(deploy.proxy.url, workers=2, pace=0.02).start()
        await async_wait_for(lambda: len(load.answers) > 50, 20, "traffic on blue")
        results = []
        for run, (to, baseline) in enumerate([("green", "blue"), ("blue", "green")] * 2):
            body = plan(
                (20, "1500ms"),
                (100, "600ms"),
                max_error_rate=0.2,
                min_requests=10,
                max_inconclusive=50,
            )
            body["to"] = to
            await deploy.start_rollout(body)
            rollout = await deploy.wait_phase("succeeded", "rolled_back", "paused", timeout=60)
            results.append(rollout["phase"])
            assert rollout["phase"] == "succeeded", (run, rollout)
            assert rollout["from"] == baseline
        await load.stop()
        assert results == ["succeeded"] * 4
        history = await deploy.admin.ok("GET", "/api/v1/rollouts")
        assert history["success_rate"] == 1.0 and history["finished"] == 4
        # the errors clients saw are the backends' 2 %, nothing the rollouts added
        assert {a.status for a in load.failed()} <= {500}


# ---- restarts ---------------------------------------------------------------------------


async def test_sigkill_mid_rollout_and_restart_resume_at_the_same_step_and_weights(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path) as deploy:
        await deploy.start_rollout(plan((10, "1h"), (40, "1h"), (100, None)))
        promoted = await deploy.admin.ok("POST", "/api/v1/rollouts/current/promote")
        assert promoted["rollout"]["step"] == 2
        assert await deploy.weights() == {"blue": 60, "green": 40}
        deploy.proxy.signal(signal.SIGKILL)
        deploy.proxy.wait(10)
        deploy.proxy.stop()  # reaps it and closes its log
        deploy.proxy.start()
        rollout = await deploy.current()
        assert (rollout["id"], rollout["phase"], rollout["step"]) == (1, "progressing", 2)
        assert rollout["weights"] == {"blue": 60, "green": 40}
        assert rollout["step_applied"] is True
        assert await deploy.weights() == {"blue": 60, "green": 40}
        load = Load(deploy.proxy.url, workers=2).start()
        await async_wait_for(lambda: len(load.answers) > 200, 20, "traffic")
        await load.stop()
        assert 0 < load.count("green") < len(load.answers)
        actions = [e["action"] for e in await events(deploy)]
        assert "rollout.restore" in actions[actions.index("rollout.promote") :]
        # and it goes on from there
        await deploy.admin.ok("POST", "/api/v1/rollouts/current/promote")
        assert await deploy.weights() == {"blue": 0, "green": 100}


# ---- the API ------------------------------------------------------------------------------


async def test_api_validation_conflicts_force_and_controls(tmp_path: Path) -> None:
    async with deployment(tmp_path, state=False) as deploy:
        admin = deploy.admin
        for body, status, message in [
            ({"steps": [{"weight": 10}]}, 400, "to: expected"),
            ({"to": "green", "steps": []}, 400, "steps: expected a list"),
            ({"to": "green", "steps": [{"weight": 101}]}, 400, "steps[0].weight"),
            ({"to": "nope", "steps": [{"weight": 1}]}, 404, "no pool named 'nope'"),
            (
                {"to": "green", "steps": [{"weight": 5}], "analysis": {"interval": "x"}},
                400,
                "analysis.interval",
            ),
        ]:
            answer = await admin.call("POST", "/api/v1/rollouts", body)
            assert answer.status == status, answer
            assert message in answer.error
        answer = await admin.call(
            "POST", "/api/v1/rollouts", {"to": "green", "steps": [{"weight": 5}]}, token=READ_TOKEN
        )
        assert answer.status == 403
        assert await deploy.weights() == {"blue": 100, "green": 0}  # nothing happened

        await deploy.start_rollout(plan((10, None), (100, None)))
        answer = await admin.call("POST", "/api/v1/rollouts", plan((10, None)))
        assert answer.status == 409 and "one rollout at a time" in answer.error
        answer = await admin.call("PUT", "/api/v1/split", {"blue": 50, "green": 50})
        assert answer.status == 409 and "force" in answer.error
        answer = await admin.call("POST", "/api/v1/flip", {"to": "green"})
        assert answer.status == 409
        assert await deploy.weights() == {"blue": 90, "green": 10}
        # reads are fine with the read token
        answer = await admin.call("GET", "/api/v1/rollouts/current", token=READ_TOKEN)
        assert answer.status == 200 and answer.json()["rollout"]["waiting"].startswith(
            "waiting for promote"
        )
        state = await admin.state()
        assert state["rollout"]["phase"] == "progressing" and state["rollout"]["step"] == 1

        paused = await admin.ok("POST", "/api/v1/rollouts/current/pause")
        assert (
            paused["rollout"]["phase"] == "paused" and paused["event"]["action"] == "rollout.pause"
        )
        assert (await admin.call("POST", "/api/v1/rollouts/current/pause")).status == 409
        resumed = await admin.ok("POST", "/api/v1/rollouts/current/resume")
        assert resumed["rollout"]["phase"] == "progressing"
        promoted = await admin.ok("POST", "/api/v1/rollouts/current/promote")
        assert promoted["rollout"]["step"] == 2 and await deploy.weights() == {
            "blue": 0,
            "green": 100,
        }
        aborted = await admin.ok("POST", "/api/v1/rollouts/current/abort")
        assert aborted["rollout"]["phase"] == "aborted"
        assert await deploy.weights() == {"blue": 100, "green": 0}

        # a forced split aborts the rollout and keeps the operator's weights
        await deploy.start_rollout(plan((10, None), (100, None)))
        answer = await admin.call("PUT", "/api/v1/split", {"blue": 70, "green": 30, "force": True})
        assert answer.status == 200, answer
        current = await deploy.current()
        assert current["phase"] == "aborted" and "forced split by default" in current["reason"]
        assert await deploy.weights() == {"blue": 70, "green": 30}

        actions = [e["action"] for e in await events(deploy)]
        for action in (
            "rollout.start",
            "rollout.step",
            "rollout.pause",
            "rollout.resume",
            "rollout.promote",
            "rollout.aborted",
        ):
            assert action in actions, action
        history = await admin.ok("GET", "/api/v1/rollouts")
        assert [r["result"] for r in history["rollouts"]] == ["aborted", "aborted"]
        assert history["success_rate"] == 0.0

        metrics = (await admin.call("GET", "/metrics")).body.decode()
        assert 'zdproxy_rollouts_total{result="aborted"} 2.0' in metrics
        assert "zdproxy_rollout_rollback_seconds_bucket" in metrics
        assert "zdproxy_rollout_step 0.0" in metrics


async def test_ctl_rollout_commands_and_exit_codes(tmp_path: Path) -> None:
    async with deployment(tmp_path, state=False) as deploy:
        url = deploy.proxy.admin_url
        done = await actl(url, "rollout", "start", "--steps", "10")
        assert done.returncode == 2 and "needs --to" in done.stderr
        done = await actl(url, "rollout", "start", "--to", "green", "--steps", "ten")
        assert done.returncode == 2 and "--steps" in done.stderr
        done = await actl(
            url, "rollout", "start", "--to", "green", "--steps", "10", "--interval", "nope"
        )
        assert done.returncode == 1 and "400: analysis.interval" in done.stderr
        done = await actl(url, "rollout", "pause")
        assert done.returncode == 1 and "409: no rollout in progress" in done.stderr

        done = await actl(
            url,
            "rollout",
            "start",
            "--to",
            "green",
            "--steps",
            "10,100:300ms",
            "--interval",
            "250ms",
            "--min-requests",
            "5",
            "--max-error-rate",
            "0.05",
            "--max-p99",
            "500ms",
            # no traffic flows: without this, 20 inconclusive verdicts (5 s on a
            # loaded machine) hold the rollout before the pause below is asked
            "--max-inconclusive",
            "1000000",
        )
        assert done.returncode == 0, done.stderr
        assert "rollout 1: blue -> green  PROGRESSING  step 1/2 (10 %)" in done.stdout
        assert "weights: blue=90 green=10" in done.stdout
        done = await actl(url, "rollout", "status")
        assert done.returncode == 0 and "waiting: waiting for promote" in done.stdout
        done = await actl(url, "rollout", "status", "--json")
        analysis = json.loads(done.stdout)["rollout"]["plan"]["analysis"]
        assert (analysis["max_p99_latency"], analysis["max_inconclusive"]) == (0.5, 1000000)
        for action, phase in (("pause", "PAUSED"), ("resume", "PROGRESSING")):
            done = await actl(url, "rollout", action)
            assert done.returncode == 0 and phase in done.stdout, done
        done = await actl(url, "rollout", "promote")
        assert done.returncode == 0 and "step 2/2 (100 %)" in done.stdout
        # the last step's pause ends with no traffic: analysis cannot pass, so abort
        done = await actl(url, "rollout", "abort")
        assert done.returncode == 0 and "ABORTED" in done.stdout
        done = await actl(url, "rollout", "status", "--watch")
        assert done.returncode == 1 and "rollout 1 aborted" in done.stderr
        assert "ABORTED" in done.stdout

        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(plan((10, "3s"), (100, "500ms"), min_requests=3)))
        load = Load(deploy.proxy.url, workers=2).start()
        done = await actl(url, "rollout", "start", "--plan", str(plan_file))
        assert done.returncode == 0, done.stderr
        done = await actl(url, "rollout", "status", "--watch")
        await load.stop()
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("rollout 2:") >= 2  # redrawn until the end
        assert "SUCCEEDED" in done.stdout
        done = await actl(url, "rollout", "history")
        assert done.returncode == 0
        assert "2 finished, success rate 50%" in done.stdout
        assert "succeeded" in done.stdout and "aborted" in done.stdout


async def test_a_failing_pre_step_webhook_pauses_the_rollout(tmp_path: Path) -> None:
    from aiohttp import web

    calls: list[dict[str, Any]] = []
    answer_with = {"status": 200}

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.Response(status=answer_with["status"])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with deployment(tmp_path, state=False) as deploy:
            body = plan((10, None), (50, None))
            body["webhooks"] = {
                "pre_step": f"http://127.0.0.1:{port}/hook",
                "post_rollout": f"http://127.0.0.1:{port}/hook",
                "timeout": "2s",
            }
            await deploy.start_rollout(body)
            await async_wait_for(
                lambda: any(c["event"] == "pre_step" for c in calls), 10, "the pre-step hook"
            )
            assert calls[0]["step"] == {"index": 1, "weight": 10, "pause": None}

            async def at(weight: int) -> bool:
                return (await deploy.weights())["green"] == weight

            await async_wait_for(lambda: at(10), 10, "step 1 applied")
            answer_with["status"] = 503
            await deploy.admin.ok("POST", "/api/v1/rollouts/current/promote")
            rollout = await deploy.wait_phase("paused", timeout=10)
            assert "pre-step webhook for step 2 failed: answered 503" in rollout["reason"]
            assert await deploy.weights() == {"blue": 90, "green": 10}
            answer_with["status"] = 200
            await deploy.admin.ok("POST", "/api/v1/rollouts/current/resume")
            await async_wait_for(lambda: at(50), 10, "step 2 applied after resume")
            await deploy.admin.ok("POST", "/api/v1/rollouts/current/promote")
            await deploy.wait_phase("succeeded", timeout=10)
            await async_wait_for(
                lambda: any(c["event"] == "post_rollout" for c in calls), 10, "post-rollout hook"
            )
    finally:
        await runner.cleanup()
