"""fms.entrypoints.server_vs_offline's config: every bad setting is refused with its name and value (the benchmark
itself runs end to end in tests/scripts/test_scripts.py::test_bench_server_vs_offline)."""

import pytest

from fms.entrypoints.server_vs_offline import ServerVsOfflineConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_prompts=0), "num_prompts must be an int >= 1, got 0"),
    (dict(output_len=-2), "output_len must be an int >= 1, got -2"),
    (dict(repeats=True), "repeats must be an int >= 1, got True"),
    (dict(warmup_prompts=-1), "warmup_prompts must be an int >= 0, got -1"),
    (dict(prompt_range="64-512"), "prompt_range must be LO,HI with 1 <= LO <= HI, got '64-512'"),
    (dict(prompt_range="512,64"), "prompt_range must be LO,HI with 1 <= LO <= HI, got '512,64'"),
    (dict(port=70000), "port must be in [1, 65535] or None (a free one), got 70000"),
    (dict(server_timeout=0), "server_timeout must be > 0 seconds, got 0"),
    (dict(idle_before_run_s=-1), "idle_before_run_s must be in [0, 60] seconds, got -1"),
    (dict(idle_before_run_s="1"), "idle_before_run_s must be in [0, 60] seconds, got '1'"),
    (dict(fresh_connections=1), "fresh_connections must be True or False, got 1"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as e:
        ServerVsOfflineConfig(**kwargs)
    assert str(e.value) == message


def test_defaults_and_a_single_prompt_length_are_accepted(tmp_path):
    config = ServerVsOfflineConfig(prompt_range="32", output=str(tmp_path / "r.json"))
    assert config.num_prompts == 8 and config.output == tmp_path / "r.json"


def test_the_script_reports_a_bad_flag_as_a_usage_error(capsys):
    from scripts import bench_server_vs_offline

    with pytest.raises(SystemExit) as e:
        bench_server_vs_offline.main(["--num-prompts", "0"])
    assert e.value.code == 2 and "num_prompts must be an int >= 1, got 0" in capsys.readouterr().err


def test_reports_name_the_tree_run_not_the_repository_around_it(monkeypatch):
    """A device run's tree is copied without its .git inside the repository (run.sh's .gpu / .wA); FMS_GIT_COMMIT
    names it, as fms.bench.results.git_commit does for the other benchmarks."""
    from fms.entrypoints.bench_serve import _commit

    monkeypatch.setenv("FMS_GIT_COMMIT", "abc1234-edee959")
    assert _commit() == "abc1234-edee959"
    monkeypatch.delenv("FMS_GIT_COMMIT")
    assert _commit() != "abc1234-edee959"


def test_a_burst_after_open_connections_opens_none():
    """open_connections leaves n keep-alive connections in the session's pool and run_load's burst on that session
    sends every request on one of them: no connection is opened inside the timed run. Without the session, each
    request of the burst comes on a new connection. A small aiohttp app on 127.0.0.1 records each request's
    client port."""
    import asyncio

    from aiohttp import web

    from fms.entrypoints.bench_serve import BenchRequest, new_session, open_connections, run_load

    async def scenario():
        peers = {"/health": [], "/v1/completions": []}

        async def health(request):
            peers["/health"].append(request.transport.get_extra_info("peername")[1])
            await asyncio.sleep(0.05)  # every GET is in flight at once, so each holds its own connection
            return web.Response(text="ok")

        async def completions(request):
            peers["/v1/completions"].append(request.transport.get_extra_info("peername")[1])
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"text": "a"}]}\n\n'
                                 b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
                                 b'data: [DONE]\n\n')
            return response

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        requests = [BenchRequest([5, 6, 7], 3, 1) for _ in range(6)]
        try:
            async with new_session() as session:
                await open_connections(session, url, 6)
                results, _ = await run_load(url, "m", requests, float("inf"), None, 0, progress=False,
                                            session=session)
                assert all(r.ok for r in results), [r.error for r in results]
                warm = (list(peers["/health"]), list(peers["/v1/completions"]))
            peers["/v1/completions"].clear()
            results, _ = await run_load(url, "m", requests, float("inf"), None, 0, progress=False)
            assert all(r.ok for r in results)
            fresh = list(peers["/v1/completions"])
        finally:
            await runner.cleanup()
        return warm, fresh

    (health, burst), fresh = asyncio.run(scenario())
    assert len(set(health)) == 6  # six connections opened before the burst
    assert len(burst) == 6 and set(burst) <= set(health)  # the burst opened none
    assert len(set(fresh)) == 6 and not set(fresh) & set(health)  # a session of its own: six new ones
