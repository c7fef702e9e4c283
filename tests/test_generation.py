"""The generation interface with the hf backend, the log-prob guard, and the parts of the vLLM
backends that need no vLLM (server lifecycle, model choice, errors). vLLM itself: test_vllm.py."""

import json
import os
import stat
import sys

import pytest

from alignloop.generation.backends import Sample, open_generator
from alignloop.generation.common import GeneratorError, ModelRef
from alignloop.generation.config import GenerationConfig
from alignloop.generation.hf import SamplingSettings
from alignloop.generation.logprobs import StalePolicyError, check_logprobs, raise_if_stale
from alignloop.pipeline.errors import StageError
from generation_helpers import PROMPTS, make_adapter, reference_logprobs

STOP_NAMES = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")  # Llama 3's end tokens (reference E)


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter"))


def test_hf_samples_carry_ids_and_the_models_logprobs(tiny_dir, tokenizer):
    """n samples per prompt; each sample's text decodes its ids, it ends at a stop token or at
    max_new_tokens, and its log-probs are those of an unpadded fp32 forward pass. Tolerance 1e-4:
    the same fp32 weights; only padding and batch shapes change the summation order (~1e-6)."""
    settings = SamplingSettings(n=3, max_new_tokens=12, temperature=1.0, seed=3)
    with open_generator(GenerationConfig(batch_size=2), tiny_dir) as gen:
        out = gen.generate(PROMPTS, settings)
        assert gen.describe()["backend"] == "hf" and gen.describe()["adapter"] is None
    assert [len(group) for group in out] == [3] * len(PROMPTS)
    pairs = [(p, s.token_ids) for p, group in zip(PROMPTS, out) for s in group]
    samples = [s for group in out for s in group]
    stops = set(tokenizer.convert_tokens_to_ids(list(STOP_NAMES)))
    for (picked, _, _), sample in zip(reference_logprobs(tiny_dir, pairs), samples, strict=True):
        assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        assert len(sample.logprobs) == len(sample.token_ids) > 0
        if sample.finish_reason == "stop":
            assert sample.token_ids[-1] in stops and not stops & set(sample.token_ids[:-1])
        else:
            assert sample.finish_reason == "length" and len(sample.token_ids) == 12
        assert max(abs(a - b) for a, b in zip(sample.logprobs, picked)) < 1e-4
    assert len({tuple(s.token_ids) for s in out[0]}) > 1  # 3 draws at T=1 over 1024 tokens differ


def test_hf_greedy_takes_the_argmax(tiny_dir):
    """temperature 0: every token is the most likely one: its log-prob (reported, and in the
    reference pass) equals the best log-prob of the reference pass, within fp32 error (1e-5)."""
    with open_generator(GenerationConfig(), tiny_dir) as gen:
        out = gen.generate(PROMPTS[:2], SamplingSettings(max_new_tokens=6))
    reference = reference_logprobs(tiny_dir, [(p, g[0].token_ids) for p, g in zip(PROMPTS[:2], out)])
    for (sample,), (picked, best, _) in zip(out, reference):
        assert len(sample.token_ids) > 0
        assert max(abs(a - b) for a, b in zip(picked, best)) < 1e-5
        assert max(abs(a - b) for a, b in zip(sample.logprobs, best)) < 1e-5
    with pytest.raises(ValueError, match="temperature"):
        with open_generator(GenerationConfig(), tiny_dir) as gen:
            gen.generate(PROMPTS[:1], SamplingSettings(n=2, temperature=0.0))


def test_hf_sampling_is_seeded_once_per_call_and_leaves_the_global_rng(tiny_dir):
    """A call draws from its own RNG seeded once with settings.seed, batch after batch: the same
    call twice gives the same samples whatever ran before it (the global RNG is advanced in
    between), another seed gives others, and the caller's global RNG is left as it was."""
    import torch

    from alignloop.generation.hf import generate_samples
    from alignloop.models.loading import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_dir), dtype=torch.float32)
    settings = SamplingSettings(n=2, max_new_tokens=6, temperature=1.0, seed=5)
    state = torch.get_rng_state()
    first = generate_samples(model, tokenizer, PROMPTS, settings, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(7)
    again = generate_samples(model, tokenizer, PROMPTS, settings, batch_size=2, progress=False)
    other = generate_samples(model, tokenizer, PROMPTS, SamplingSettings(
        n=2, max_new_tokens=6, temperature=1.0, seed=6), batch_size=2, progress=False)
    ids = [[[s.token_ids for s in g] for g in out] for out in (first, again, other)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


@pytest.mark.slow
def test_adapter_samples_pass_the_guard_and_fail_it_against_the_base(adapter_dir, tiny_dir):
    """hf sampling from the adapter (peft): its log-probs match the adapter within the fp32
    tolerance (1e-3), and are far from the base's (the adapter moves them by ~0.2 on average,
    see make_adapter), so checking them against the base raises StalePolicyError."""
    with open_generator(GenerationConfig(), adapter_dir) as gen:
        out = gen.generate(PROMPTS, SamplingSettings(n=2, max_new_tokens=10, temperature=1.0))
        assert gen.describe()["adapter"] == str(adapter_dir)
    assert check_logprobs(adapter_dir, PROMPTS, out, 1e-3)["ok"]
    wrong = check_logprobs(tiny_dir, PROMPTS, out, 1e-3)
    assert not wrong["ok"] and wrong["max_abs_diff"] > 0.1 and wrong["tokens"] == sum(
        len(s.token_ids) for group in out for s in group)
    with pytest.raises(StalePolicyError, match=str(tiny_dir)) as err:
        raise_if_stale(tiny_dir, PROMPTS, out, 1e-3)
    assert isinstance(err.value, StageError)


def test_guard_in_the_generator_checks_each_call(tiny_dir):
    """check_logprobs: true wraps the generator; each generate call adds one report over
    `check_samples` samples (here 3 of 2 x 2 = 4), all within the fp32 tolerance 1e-3."""
    cfg = GenerationConfig(check_logprobs=True, check_samples=3)
    with open_generator(cfg, tiny_dir) as gen:
        for seed in (0, 1):
            gen.generate(PROMPTS[:2], SamplingSettings(n=2, max_new_tokens=5, temperature=1, seed=seed))
        checks = gen.checks
    assert [c["samples"] for c in checks] == [3, 3] and all(c["ok"] for c in checks)
    assert all(c["tolerance"] == 1e-3 and c["max_abs_diff"] < 1e-4 for c in checks)


def test_token_logprobs_batched_equal_one_at_a_time(tiny_dir):
    """Left padding, position ids and logits_to_keep on odd shapes (prompts of 3, 11, 7 tokens,
    completions of 1, 9, 0 tokens, batches of 2) give what one unpadded sequence at a time gives
    (batch_size 1: no padding at all), within fp32 summation-order error (1e-5)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignloop.generation.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = [[5, 6, 7], list(range(100, 111)), [9, 8, 7, 6, 5, 4, 3]]
    completions = [[42], list(range(300, 309)), []]
    batched = token_logprobs(model, prompts, completions, pad_id=1021, batch_size=2)
    single = token_logprobs(model, prompts, completions, pad_id=1021, batch_size=1)
    assert [len(x) for x in batched] == [1, 9, 0]
    assert max(abs(a - b) for x, y in zip(batched, single) for a, b in zip(x, y)) < 1e-5
    with torch.no_grad():  # the first pair by hand
        logits = model(torch.tensor([prompts[0] + completions[0]])).logits[0, -2]  # (V,)
    assert abs(logits.log_softmax(-1)[42].item() - single[0][0]) < 1e-6


def test_check_needs_logprobs(tiny_dir):
    sample = Sample(text="x", token_ids=[5], logprobs=None, finish_reason="length")
    with pytest.raises(StalePolicyError, match="no log-probs for 1 of 1"):
        check_logprobs(tiny_dir, PROMPTS[:1], [[sample]], 1e-3)


def test_vllm_backends_explain_what_is_missing(tiny_dir, monkeypatch):
    with pytest.raises(GeneratorError, match="server_url .* or generation.server_python"):
        with open_generator(GenerationConfig(backend="vllm_server"), tiny_dir):
            pass
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(GeneratorError, match="vLLM is not installed"):
        with open_generator(GenerationConfig(backend="vllm"), tiny_dir):
            pass


def fake_python(tmp_path, body: str):
    """An executable that stands in for server_python: it answers alignloop's platform probe
    (`-c ...`: "True", a CPU build) and runs `body` when asked to start the server."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo True; exit 0; fi\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_server_that_exits_is_reported_with_its_log(tiny_dir, tmp_path):
    python = fake_python(tmp_path, "echo 'no CUDA here' >&2\nexit 3\n")
    cfg = GenerationConfig(backend="vllm_server", server_python=python, server_timeout=60)
    with pytest.raises(GeneratorError, match=r"(?s)exited with status 3.*no CUDA here"):
        with open_generator(cfg, tiny_dir):
            pass


def test_a_python_without_vllm_is_reported(tiny_dir, tmp_path):
    """The platform probe fails (as `import vllm` does where vLLM is missing): the error says so
    before any server starts."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'vllm'\" >&2\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    cfg = GenerationConfig(backend="vllm_server", server_python=str(python))
    with pytest.raises(GeneratorError, match="(?s)cannot import vLLM there.*No module named 'vllm'"):
        with open_generator(cfg, tiny_dir):
            pass


def test_a_server_that_never_answers_is_stopped_with_its_children(tiny_dir, tmp_path):
    """After server_timeout the server's whole process group (here: the fake server and a child
    it started) is gone: no orphans."""
    pids = tmp_path / "pids"
    python = fake_python(tmp_path, f"sleep 300 &\necho $$ $! > {pids}\nwait\n")
    cfg = GenerationConfig(backend="vllm_server", server_python=python, server_timeout=3)
    with pytest.raises(GeneratorError, match="did not answer .* within 3 s"):
        with open_generator(cfg, tiny_dir):
            pass
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_pick_model_by_directory_then_by_uniqueness(tmp_path):
    from alignloop.generation.vllm_server import pick_model

    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    ref = ModelRef(path=adapter, base=base, adapter=adapter, tokenizer=adapter)
    served = [{"id": "base", "root": base}, {"id": "policy", "root": adapter}]
    assert pick_model(served, ref, None) == "policy"
    assert pick_model(served, ref, "base") == "base"
    assert pick_model(served[:1], ref, None) == "base"  # the only one: the guard must vouch for it
    with pytest.raises(GeneratorError, match="none from"):
        pick_model([served[0], {"id": "other", "root": "/x"}], ref, None)
    with pytest.raises(GeneratorError, match="'nope' is not served"):
        pick_model(served, ref, "nope")


def test_cli_generate_rows_say_how_each_sample_ended(tiny_dir, tmp_path):
    from alignloop.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "What is 2 plus 2?"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(out),
                 "--n", "2", "--temperature", "1.0", "--max-new-tokens", "4", "--backend", "hf"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["a:0", "a:1"]
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert rows[0]["generator"]["backend"] == "hf" and rows[0]["generator"]["n"] == 2
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--output", str(out),
                 "--generation", "max_model_len=zero"]) == 2
