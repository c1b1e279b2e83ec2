"""SamplingParams validation and Request bookkeeping."""

import pytest

from fms.serving.request import FinishReason, Request, RequestOutput, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=1.0), "seed"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids="ab"), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_are_greedy():
    p = SamplingParams(stop_token_ids=[3, 4])
    assert p.is_greedy and p.stop_token_ids == (3, 4)
    assert not SamplingParams(temperature=0.7).is_greedy


def test_request_finishes_and_reports_timings():
    r = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=3, stop_token_ids=(9,)), eos_token_ids=frozenset({2}))
    assert r.num_tokens_to_compute == 3 and r.max_num_tokens == 5
    r.append_token(5, now=r.arrival_time + 1.0)
    r.append_token(2, now=r.arrival_time + 1.5)  # EOS
    assert r.finish_reason is FinishReason.STOP and r.all_token_ids == [1, 2, 3, 5, 2]
    out = RequestOutput.from_request(r)
    assert out.finish_reason == "stop" and out.time_to_first_token == pytest.approx(1.0)
    assert out.inter_token_latencies == [pytest.approx(0.5)] and out.latency == pytest.approx(1.5)
    r2 = Request("r2", [1], SamplingParams(max_new_tokens=1, ignore_eos=True), eos_token_ids=frozenset({2}))
    r2.append_token(2, now=0.0)
    assert r2.finish_reason is FinishReason.LENGTH
