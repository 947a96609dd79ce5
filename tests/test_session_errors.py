"""Session bad input: one-line FmIndexError messages; the CLI turns them into exit code 2."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lsa_runtime.errors import FmIndexError
from lsa_runtime.session import DeviceMemoryError, Session

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("options, message", [
    ({"mode": "all", "tau": 0}, r"tau \(--tau\) must be an integer >= 1"),
    ({"mode": "all", "tau": -3}, r"tau \(--tau\) must be an integer >= 1"),
    ({"mode": "all", "tau": 2.5}, r"tau \(--tau\) must be an integer >= 1"),
    ({"mode": "all", "threshold": 0.0}, r"threshold \(--threshold\) must be in \(0, 1\)"),
    ({"mode": "all", "threshold": 1.0}, r"threshold \(--threshold\) must be in \(0, 1\)"),
    ({"mode": "all", "threshold": 1.5}, r"threshold \(--threshold\) must be in \(0, 1\)"),
    ({"mode": "sparse"}, "unknown mode 'sparse'"),
    ({"mode": "lsa"}, "mode 'lsa' needs an exported memory indexer"),
    ({"mode": "recent"}, r"mode 'recent' needs a budget: budget=N \(--budget N\)"),
    ({"mode": "random", "budget": 0}, r"budget \(--budget\) must be >= 1"),
    ({"mode": "hisparse", "budget": 8}, "must hold one step.s top-k"),
    ({"mode": "lsa", "indexer": "/nonexistent/export"}, "is not a directory"),
    ({"mode": "all", "chunk_size": 0}, r"chunk_size \(--chunk-size\) must be >= 1"),
])
def test_bad_options_are_one_line_errors(backbone, options, message):
    model, tokenizer = backbone
    with pytest.raises(FmIndexError, match=message) as info:
        Session(model, tokenizer, **options)
    assert "\n" not in str(info.value)


def test_export_directory_without_config_is_refused(backbone, tmp_path):
    model, _ = backbone
    with pytest.raises(FmIndexError, match="no lsa_config.json"):
        Session(model, mode="lsa", indexer=tmp_path)


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty"),
    ([5, 1024], "token id 1024 is outside the vocabulary"),
    ([5, -1], "token id -1 is outside the vocabulary"),
])
def test_bad_prompts(backbone, prompt, message):
    model, tokenizer = backbone
    with pytest.raises(FmIndexError, match=message):
        Session(model, tokenizer, mode="full").generate(prompt, max_new_tokens=1)


def test_stream_reports_bad_input_before_the_first_token(backbone):
    model, tokenizer = backbone
    with pytest.raises(FmIndexError, match="the prompt is empty"):
        Session(model, tokenizer, mode="full").stream([], max_new_tokens=1)  # no next() needed


def test_prompt_longer_than_the_model_maximum(backbone):
    model, tokenizer = backbone
    too_long = [5] * (model.config.max_position_embeddings + 1)
    with pytest.raises(FmIndexError, match="longer than the model's maximum of 65,536"):
        Session(model, tokenizer, mode="all").generate(too_long, max_new_tokens=1)


def test_keep_context_needs_a_previous_call(backbone):
    model, tokenizer = backbone
    with pytest.raises(FmIndexError, match="keep_context=True needs a previous generate"):
        Session(model, tokenizer, mode="full").generate([5, 6], max_new_tokens=1, keep_context=True)


def test_device_out_of_memory_is_a_one_line_error_and_the_session_recovers(backbone, monkeypatch):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="recent", budget=4, tau=4, chunk_size=16)
    expected = session.generate(list(range(3, 60)), max_new_tokens=4).token_ids

    def exhausted(state, ids):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 1 MiB free")

    with monkeypatch.context() as patch:
        patch.setattr(session, "_forward", exhausted)
        with pytest.raises(DeviceMemoryError, match="out of memory at") as info:
            session.generate(list(range(3, 60)), max_new_tokens=4)
    assert "\n" not in str(info.value) and "Tried to allocate 2.00 GiB" in str(info.value)
    assert session.generate(list(range(3, 60)), max_new_tokens=4).token_ids == expected


def test_cli_generate_prints_text_and_stats():
    result = runner.invoke(app, ["generate", "--model", "tiny", "--mode", "recent", "--budget", "8", "--tau", "4",
                                 "--prompt", "The cold pool keeps every entry. " * 3, "--max-new-tokens", "8",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "CSA-KV ratio" in result.output and "total KV ratio" in result.output and "triggers" in result.output


def test_cli_generate_static_decode_prints_the_default_paths_text():
    """--static-decode gives the default path's text in mode full (--stock-decode, the CPU's default) and in a
    trigger mode (recent); with mode hisparse it is refused (exit 2)."""
    args = ["generate", "--model", "tiny", "--device", "cpu", "--mode", "full", "--prompt",
            "The cold pool keeps every entry. " * 3, "--max-new-tokens", "12"]
    plain, stock, static = (runner.invoke(app, [*args, *flag]) for flag in ([], ["--stock-decode"],
                                                                            ["--static-decode"]))
    assert plain.exit_code == stock.exit_code == static.exit_code == 0, static.output
    text = lambda out: out.output.split("KV footprint:", 1)[0]  # the generated text, before the stats table
    assert text(static) == text(plain) == text(stock) and text(plain)
    recent = ["generate", "--model", "tiny", "--device", "cpu", "--mode", "recent", "--budget", "6", "--tau", "8",
              "--prompt", "The cold pool keeps every entry. " * 12, "--max-new-tokens", "30"]  # 3 triggers decoding
    plain, static = (runner.invoke(app, [*recent, *flag]) for flag in ([], ["--static-decode"]))
    assert plain.exit_code == static.exit_code == 0, static.output
    assert text(static) == text(plain) and text(plain)
    refused = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--mode", "hisparse", "--budget",
                                  "8", "--prompt", "x", "--static-decode"])
    assert refused.exit_code == 2 and "does not run mode 'hisparse'" in refused.output, refused.output


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--tau", "0"], "tau (--tau) must be an integer >= 1"),
    (["--prompt", "x", "--threshold", "2"], "threshold (--threshold) must be in (0, 1)"),
    (["--prompt", "x", "--indexer", "/nonexistent/export"], "is not a directory"),
    (["--prompt", "x", "--mode", "lsa"], "needs an exported memory indexer"),
    (["--prompt", "x", "--prompt-file", "f.txt"], "exactly one of --prompt"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
])
def test_cli_generate_bad_input_exits_2(args, message):
    result = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_policy_selecting_invisible_entries_is_refused(backbone):
    from lsa_runtime.policies import GivenEntriesPolicy

    model, tokenizer = backbone
    session = Session(model, tokenizer, policy=GivenEntriesPolicy(lambda state: [0, state.n_visible]), tau=4)
    with pytest.raises(FmIndexError, match="selected entry 10, outside the 10 visible entries"):
        session.generate(list(range(3, 43)), max_new_tokens=2)


def test_decoding_stops_at_the_model_maximum(backbone):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="full")
    session.max_positions = 50  # positions 0..49: after a 40-token prompt, 10 tokens are run, 11 sampled
    out = session.generate(list(range(3, 43)), max_new_tokens=30, stop_at_eos=False)
    assert len(out.token_ids) == 11 and out.finish_reason == session.finish_reason == "max_position"
    assert out.stats.context_tokens == 50


@pytest.mark.parametrize("fields, message", [
    ({"mode": "all", "budget": 2.5}, r"budget \(--budget\) must be >= 1 entries"),
    ({"mode": "all", "memory_keys": "disk"}, r"memory_keys \(--memory-keys\) must be 'device' or 'pool'"),
    ({"mode": "all", "tau": 8, "prefetch_steps": 8}, r"prefetch_steps \(--prefetch-steps\) must be an integer in 0..tau-1 = 0..7"),
    ({"mode": "hisparse"}, "mode 'hisparse' needs a budget"),
])
def test_session_config_is_validated_when_built(fields, message):
    from lsa_runtime.config import SessionConfig

    with pytest.raises(FmIndexError, match=message):
        SessionConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"temperature": -1.0}, r"temperature \(--temperature\) must be >= 0"),
    ({"top_p": 0.0}, r"top_p \(--top-p\) must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be >= 0"),
])
def test_sampling_params_are_validated_when_built(backbone, fields, message):
    from lsa_runtime.config import SamplingParams

    with pytest.raises(FmIndexError, match=message):
        SamplingParams(**fields)
    model, tokenizer = backbone
    with pytest.raises(FmIndexError, match=message):  # the keyword shortcuts of generate build the same object
        Session(model, tokenizer, mode="full").generate([5, 6], max_new_tokens=1, **fields)


def test_cli_generate_empty_prompt_and_unconditional():
    empty = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--prompt", ""])
    assert empty.exit_code == 2 and "the prompt is empty" in empty.output and "--unconditional" in empty.output
    result = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--unconditional",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    both = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--unconditional", "--prompt", "x"])
    assert both.exit_code == 2 and "--unconditional generates without a prompt" in both.output, both.output
    oracle = runner.invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--mode", "oracle", "--tau", "4",
                                 "--prompt", "The cold pool keeps every entry. " * 8, "--max-new-tokens", "6"])
    assert oracle.exit_code == 0 and "oracle (native top-k of full decoding)" in oracle.output, oracle.output
