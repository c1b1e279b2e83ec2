"""scripts/inference.py: prompt in, text out, and clear errors."""


import pytest

from scripts import inference as inference_script


@pytest.fixture(scope="module")
def inference():
    return inference_script


@pytest.mark.parametrize("attn_name", ["sdpa", "paged"])
def test_prompt_in_text_out(inference, capsys, attn_name):
    argv = ["--variant", "micro", "--attn_name", attn_name, "--device_type", "cpu", "--max_new_tokens", "5",
            "--prompt", "Paged attention", "--prompt", "A page"]
    assert inference.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Paged attention") and lines[1].startswith("A page")
    assert all(len(line) > len(p) for line, p in zip(lines, ["Paged attention", "A page"]))


def test_both_backends_print_the_same_text(inference, capsys):
    texts = []
    for attn_name in ("sdpa", "paged"):
        inference.main(["--attn_name", attn_name, "--device_type", "cpu", "--max_new_tokens", "6", "--prompt", "Hi"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_decode_window_prints_the_per_token_text(inference, capsys):
    texts = []
    for extra in ([], ["--decode_window", "4"]):
        assert inference.main(["--attn_name", "paged", "--device_type", "cpu", "--max_new_tokens", "9",
                               "--prompt", "Hi", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("argv,message", [
    (["--decode_window", "0"], "decode_window must be an int >= 1"),
    (["--cuda_graphs"], "give decode_window too"),
    (["--attn_name", "nope"], "unknown attn_name 'nope'"),
    (["--variant", "huge"], "unknown variant 'huge'"),
    (["--max_new_tokens", "-2"], "max_new_tokens must be an int >= 0"),
])
def test_bad_arguments_exit_2_with_a_message(inference, capsys, argv, message):
    assert inference.main(argv + ["--device_type", "cpu"]) == 2
    assert message in capsys.readouterr().err
