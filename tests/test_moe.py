"""LoRA on Mixture-of-Experts checkpoints (docs/moe.md), on tiny random Mixtral, Qwen3-MoE, OLMoE
and Llama 4 text models (`build_tiny(architecture=...)`: 2 layers, 4 routed experts).

What is adapted (every routed expert, the router only when asked), the audit's errors (they name
the recipe key), the expert-LoRA kernel against the plain reference and peft (forward and
backward, odd shapes, derived tolerances) and its saved-for-backward memory, merged == unmerged
logits across transformers' experts implementations and after save / reload, and the loss as
CE + coef x aux with a router gradient when the router trains."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from alignloop.kernels import moe_lora
from alignloop.kernels.moe_lora_reference import LoraFactors, delta_weight, experts_reference
from alignloop.models.loading import lora_config
from alignloop.models.memory import SavedTensors, parameter_count
from alignloop.models.moe import LoraTargetError, check_coverage, coverage, moe_blocks
from alignloop.models.moe_load import aux_loss, load_cv
from alignloop.models.tiny import build_tiny
from alignloop.options import LoraOptions

MOE = ["mixtral", "qwen3_moe", "olmoe", "llama4_text"]
INTERFACE = ["mixtral", "qwen3_moe", "olmoe"]  # experts that dispatch through transformers' interface
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]


@pytest.fixture(scope="module")
def tiny(alignloop_cache):
    paths = {}

    def build(architecture: str) -> str:
        if architecture not in paths:
            paths[architecture] = str(build_tiny(architecture=architecture, num_hidden_layers=2,
                                                 initializer_range=0.1))
        return paths[architecture]
    return build


def load(path: str, implementation: str | None = None):
    kwargs = {"experts_implementation": implementation} if implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def adapted(path: str, options: LoraOptions = LoraOptions(), implementation: str | None = None,
            seed: int = 0):
    """The model with our resolved LoRA, every B drawn from N(0, 0.05) so that the adapter
    changes the logits (peft starts B at zero); A is peft's seeded random init."""
    torch.manual_seed(seed)
    model = load(path, implementation)
    peft = get_peft_model(model, lora_config(options, model=model, key="sft.lora"))
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return peft.eval()


def tokens(seed: int = 0, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))


def rows(model) -> dict:
    return {row["kind"]: row for row in coverage(model)}


# ---------------------------------------------------------------------------------------------
# What is adapted


@pytest.mark.parametrize("architecture", MOE)
def test_every_routed_expert_gets_an_adapter_and_the_router_none(tiny, architecture):
    model = adapted(tiny(architecture))
    kinds = rows(model)
    assert kinds["routed experts"]["tensors"] == 4 and kinds["routed experts"]["lora"] == 4  # 2 layers x 2
    assert kinds["router"]["tensors"] == 2 and kinds["router"]["lora"] == kinds["router"]["full"] == 0
    assert kinds["attention"]["lora"] == kinds["attention"]["tensors"] == 8
    if architecture == "llama4_text":  # its shared expert: three nn.Linear per layer
        assert kinds["shared experts"]["lora"] == kinds["shared experts"]["tensors"] == 6
    check_coverage(coverage(model), LoraOptions())
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()  # Llama 4's tuple router still runs


@pytest.mark.parametrize("architecture", ["mixtral", "llama4_text"])
@pytest.mark.parametrize("router, column", [("lora", "lora"), ("full", "full")])
def test_the_router_is_adapted_only_when_asked(tiny, architecture, router, column):
    kinds = rows(adapted(tiny(architecture), LoraOptions(router=router)))
    assert kinds["router"][column] == kinds["router"]["tensors"] == 2
    assert kinds["routed experts"]["lora"] == 4


@pytest.mark.parametrize("architecture, key", [("mixtral", "sft.lora.router"),
                                               ("llama4_text", "sft.lora.experts")])
def test_peft_all_linear_pitfalls_are_caught_naming_the_key(tiny, architecture, key):
    """peft 0.21's own all-linear adapts Mixtral-style routers, and on Llama 4 adapts the router
    (whose tuple output then breaks the forward) and never the routed experts: the audit stops
    both, naming the key to change."""
    model = get_peft_model(load(tiny(architecture)), LoraConfig(r=4, target_modules="all-linear",
                                                                lora_dropout=0.0))
    with pytest.raises(LoraTargetError, match=rf"^{key}: "):
        check_coverage(coverage(model), LoraOptions(), "sft.lora")
    if architecture == "llama4_text":
        assert rows(model)["routed experts"]["lora"] == 0
        with pytest.raises(AttributeError):  # what the audit keeps from happening mid-training
            model(tokens())


@pytest.mark.parametrize("architecture, options, key, words", [
    ("mixtral", {"target_modules": ["q_proj", "w1"]}, "sft.lora.target_modules.1", "transformers 4 name"),
    ("mixtral", {"target_modules": ["q_proj", "gate_proj"], "experts": False},
     "sft.lora.target_modules.1", "transformers 4 name"),
    ("qwen3_moe", {"target_modules": ["gate"]}, "sft.lora.target_modules.0", "selects the router"),
    ("llama4_text", {"target_modules": ["q_proj", "router"]}, "sft.lora.target_modules.1", "selects the router"),
    ("llama", {"target_modules": ["q_proj", "qproj"]}, "sft.lora.target_modules.1", "matches no module"),
    ("olmoe", {"dropout": 0.1}, "sft.lora.dropout", "no dropout"),
], ids=["v4-w1", "v4-gate_proj", "qwen3-router", "llama4-router", "dense-typo", "dropout"])
def test_target_errors_name_the_key(tiny, architecture, options, key, words):
    path = tiny(architecture) if architecture != "llama" else str(build_tiny())
    with pytest.raises(LoraTargetError, match=rf"^{key}: .*{words}") as err:
        lora_config(LoraOptions(**options), model=load(path), key="sft.lora")
    assert err.value.key == key


def test_dropout_is_zero_unless_set(tiny):
    """peft's target_parameters refuse dropout: the default 0.05 becomes 0 on an MoE model."""
    model = load(tiny("mixtral"))
    assert lora_config(LoraOptions(), model=model).lora_dropout == 0.0
    assert lora_config(LoraOptions(), model=load(str(build_tiny()))).lora_dropout == 0.05


# ---------------------------------------------------------------------------------------------
# The expert-LoRA kernel against the reference and peft


def _block(config, rank: int, seed: int, implementation: str):
    """One MoE block of a 1-layer model with expert LoRA (B drawn), its router trainable."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.set_experts_implementation(implementation)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=["q_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    block = peft.base_model.model.model.layers[0].mlp
    block.gate.weight.requires_grad_(True)
    return peft, block


def _factors(wrapper) -> LoraFactors:
    """peft's ParamWrapper weights in the reference's form: lora_A (E r, in) is expert-major,
    (E, r, in); lora_B (out, r E) is expert-minor, (out, r, E) -> (E, out, r)."""
    e = wrapper.num_experts
    a = wrapper.lora_A["default"].weight
    b = wrapper.lora_B["default"].weight
    return LoraFactors(a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1),
                       wrapper.scaling["default"])


def _run(block, x):
    """Output and gradients of the block for input x (N, H)."""
    x = x.clone().requires_grad_(True)
    out = block(x[None])[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = [x.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]
    for p in block.parameters():
        p.grad = None
    return out.detach(), grads


# peft's path runs under transformers' eager experts for the odd shape: its grouped_mm refuses
# widths that are not 16-byte multiples on CPU ("strides should be multiple of 16 bytes")
SHAPES = {"odd": dict(hidden_size=18, intermediate_size=10, num_local_experts=5, rank=3, tokens=13,
                      implementation="eager"),
          "aligned": dict(hidden_size=32, intermediate_size=16, num_local_experts=4, rank=4, tokens=9,
                          implementation="grouped_mm")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_kernel_equals_peft_and_the_reference(shape, dtype):
    """Forward and every gradient (input, LoRA A and B, router) of one Mixtral block: ours vs
    peft's W + BA (transformers' experts) vs the fp64 per-expert reference. Forward tolerance,
    the FlashAttention rule: ours may be off the fp64 reference by at most 2x what peft's path is
    in the same dtype (and at least 2 ulps of the output's magnitude). "odd" (5 experts, rank 3,
    widths not 16-byte multiples) takes the loop; "aligned" torch's grouped_mm. Gradients: ours
    vs peft's, the same maths summed in other orders, within 16 ulps of the dtype at the
    gradient's largest entry (measured: at most 4.4 in fp32, 3.8 in bf16)."""
    s = SHAPES[shape]
    config = MixtralConfig(vocab_size=64, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                           num_local_experts=s["num_local_experts"], num_experts_per_tok=2,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    x = torch.randn(s["tokens"], s["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dtype)
    peft, block = _block(config, s["rank"], seed=0, implementation=s["implementation"])
    peft.to(dtype)
    theirs, their_grads = _run(block, x)
    assert moe_lora.install(peft)
    ours, our_grads = _run(block, x)
    assert len(our_grads) == len(their_grads) == 6  # x, router, gate_up A/B, down A/B
    raw_weight = block.experts.base_layer.base_layer.gate_up_proj
    assert moe_lora._grouped_mm_fits(x, raw_weight.transpose(-2, -1)) == (shape == "aligned")

    experts, down = block.experts, block.experts  # down_proj wraps gate_up_proj (peft nests them)
    gate_up = experts.base_layer
    raw = gate_up.base_layer
    with torch.no_grad():
        logits = x.double() @ block.gate.weight.double().T
        weights, index = torch.softmax(logits, -1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        f64 = lambda f: LoraFactors(f.a.double(), f.b.double(), f.scaling)  # noqa: E731
        reference = experts_reference(x.double(), index, weights, raw.gate_up_proj.double(),
                                      raw.down_proj.double(), raw.act_fn, gate_up_lora=f64(_factors(gate_up)),
                                      down_lora=f64(_factors(down)))
        # the reference's factors are peft's delta: B A per expert (its merge adds the same)
        assert torch.allclose(delta_weight(_factors(gate_up)).float(),
                              gate_up.get_delta_weight("default").float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    eps = torch.finfo(dtype).eps
    floor = eps * reference.abs().max().item()
    assert (ours.double() - reference).abs().max() <= 2 * max((theirs.double() - reference).abs().max().item(), floor)
    for mine, peft_grad in zip(our_grads, their_grads):
        bound = 16 * eps * max(peft_grad.abs().max().item(), 1e-3)
        assert (mine.float() - peft_grad.float()).abs().max() <= bound


def test_the_disabled_adapter_is_the_base(tiny):
    """DPO's reference pass: with the adapter disabled no parametrization is active and the
    kernel computes W alone."""
    model = adapted(tiny("qwen3_moe"))
    assert moe_lora.install(model) and moe_lora.installed(model)
    ids = tokens()
    with torch.no_grad(), model.disable_adapter():
        disabled = model(ids).logits
    with torch.no_grad():
        adapter_on = model(ids).logits
        base = load(tiny("qwen3_moe"))(ids).logits
    assert (disabled - base).abs().max() <= 1e-5 < (adapter_on - base).abs().max()


def test_kernel_keeps_no_copy_of_the_experts():
    """Saved for backward, one step of a 2-layer Qwen3-MoE (8 experts, H 64, I 128; 2 x 24 tokens),
    parameters left out: peft's target_parameters keep W + BA of both expert tensors per layer,
    8 x 3 x 64 x 128 x 4 bytes = 768 KiB a layer, on top of what attention-only LoRA keeps; our
    kernel adds the block's input (48 x 64 x 4 = 12 KiB) and the (S, r) products per layer, so it
    stays within 1.1x attention-only."""
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=128, num_experts=8,
                            num_experts_per_tok=2, decoder_sparse_step=1)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

    def saved(experts: bool, ours: bool) -> int:
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(
            r=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None))
        if ours:
            moe_lora.install(model)
        with SavedTensors(model.parameters()) as s:
            loss = model(ids, labels=ids).loss
        loss.backward()
        return s.bytes

    attention, peft, ours = saved(False, False), saved(True, False), saved(True, True)
    copies = 2 * 8 * 3 * 64 * 128 * 4
    assert peft >= attention + copies
    assert ours <= 1.1 * attention


# ---------------------------------------------------------------------------------------------
# Merge and export


@pytest.mark.parametrize("architecture", INTERFACE)
def test_merged_equals_unmerged_across_implementations_and_reload(tiny, architecture, tmp_path):
    """fp32 logits within 1e-5: the adapter under eager / batched_mm / grouped_mm (peft's path)
    and alignloop_lora, the merged model under each implementation, the adapter saved and
    reloaded on a fresh base, the merged model saved and reloaded by transformers."""
    path, ids = tiny(architecture), tokens()
    logits = {}
    with torch.no_grad():
        for impl in IMPLEMENTATIONS:
            model = adapted(path, implementation=impl)
            logits[f"adapter/{impl}"] = model(ids).logits
            logits[f"merged/{impl}"] = model.merge_and_unload()(ids).logits
        model = adapted(path)
        moe_lora.install(model)
        logits["adapter/alignloop_lora"] = model(ids).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(load(path), tmp_path / "adapter").eval()
        logits["adapter/reloaded"] = reloaded(ids).logits
        reloaded.merge_and_unload().save_pretrained(tmp_path / "merged")
        logits["merged/reloaded"] = load(str(tmp_path / "merged"))(ids).logits
        base = load(path)(ids).logits
    first = logits["adapter/grouped_mm"]
    assert (first - base).abs().max() > 1e-2  # the adapter does something
    for name, value in logits.items():
        assert (value - first).abs().max() <= 1e-5, name


def test_llama4_merged_equals_unmerged_and_reload(tiny, tmp_path):
    """Llama 4's experts run through peft's W + BA (no experts interface): the same checks."""
    path, ids = tiny("llama4_text"), tokens()
    with torch.no_grad():
        model = adapted(path, LoraOptions(router="lora"))
        assert not moe_lora.install(model)
        unmerged = model(ids).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(load(path), tmp_path / "adapter").eval()
        assert (reloaded(ids).logits - unmerged).abs().max() <= 1e-5
        reloaded.merge_and_unload().save_pretrained(tmp_path / "merged")
        merged = load(str(tmp_path / "merged"))(ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# The loss with the router's aux loss


def _sft_trainer(path, tmp_path, options, coef):
    from trl import SFTConfig, SFTTrainer

    from alignloop.data.masks import build_sft_dataset
    from alignloop.data.tasks import BUILTIN
    from alignloop.options import MoeOptions
    from alignloop.training import moe_aux_coef
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    records = BUILTIN["arithmetic"](count=4, seed=0)
    dataset, _ = build_sft_dataset(records, tokenizer, 64, "error")
    model = load(path).train()
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64,
                     per_device_train_batch_size=4)
    assert moe_aux_coef(model, MoeOptions(aux_loss_coef=coef), args) == coef
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(options, model=model))
    return trainer, trainer.data_collator([dataset[i] for i in range(4)])


@pytest.mark.parametrize("architecture, router", [("qwen3_moe", "frozen"), ("qwen3_moe", "lora"),
                                                  ("mixtral", "full"), ("llama4_text", "lora")])
@pytest.mark.parametrize("head", ["trl", "alignloop"])
def test_loss_is_ce_plus_coef_times_aux(tiny, tmp_path, architecture, router, head):
    """TRL's compute_loss (with its fused head, or ours installed in front of it) equals the
    cross-entropy of the plain forward's logits plus coef x the load-balancing loss of its router
    logits, to fp32 summation order; the router gets a gradient exactly when it trains."""
    from alignloop.kernels import fused_head

    coef = 0.05  # not the checkpoints' 0.001 / 0.01: the term must be the recipe's
    trainer, batch = _sft_trainer(tiny(architecture), tmp_path, LoraOptions(router=router), coef)
    if head == "alignloop":
        fused_head.install(trainer.model)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_router_logits=True)
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten())
        config = trainer.model.get_base_model().config
        aux = aux_loss(out.router_logits, config, batch["attention_mask"])
    assert abs(loss.item() - (ce + coef * aux).item()) <= 1e-5 * max(1.0, loss.item())
    assert aux.item() > 1.0  # E * sum f P >= 1 for any router
    loss.backward()
    trained = {n: p.grad for n, p in trainer.model.named_parameters()
               if p.requires_grad and (".gate." in n or ".router." in n)}
    moved = [n for n, grad in trained.items() if grad is not None and grad.abs().sum() > 0]
    if router == "frozen":
        assert trained == {}
    else:  # LoRA: B starts at 0, so at first only B gets a gradient; full: the router's copy
        assert moved and all(("lora_B" in n) == (router == "lora") for n in moved), moved


# ---------------------------------------------------------------------------------------------
# Small pieces


def test_router_load_counts_real_tokens_in_training_forwards(tiny):
    """Through peft's wrapper: k assignments per unpadded token, none for padding, none in a
    no-grad (evaluation, DPO reference) forward."""
    from alignloop.models.moe_load import RouterLoad

    model = adapted(tiny("mixtral")).train()
    load = RouterLoad(model, top_k=2)
    ids, mask = tokens(), torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # 4 padding positions
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(c is None for c in load.counts.values())
    model(input_ids=ids, attention_mask=mask)
    assert [int(c.sum()) for c in load.counts.values()] == [2 * 18] * 2
    shares = load.total()
    assert len(shares) == 2 and all(sum(s) == pytest.approx(2.0) for s in shares.values())
    load.close()


def test_load_cv_and_parameter_count(tiny):
    assert load_cv([0.5, 0.5, 0.5, 0.5]) == 0.0
    assert load_cv([2.0, 0.0, 0.0, 0.0]) == pytest.approx(3 ** 0.5)  # everything on one of 4
    for architecture in MOE:
        model = load(tiny(architecture))
        assert parameter_count(model.config) == pytest.approx(model.num_parameters(), rel=0.02)
        assert len(moe_blocks(model)) == 2


# ---------------------------------------------------------------------------------------------
# Serving: the log-prob guard catches an expert adapter that the server dropped


class _FakeGenerator:
    """Answers each prompt with fixed tokens and the log-probs that `scorer` gives them: the
    adapter's (a server that applied it) or the base's (one that dropped it, as vLLM did)."""

    start_seconds = 0.0

    def __init__(self, scorer, tokenizer):
        self.scorer, self.tokenizer = scorer, tokenizer

    def generate(self, prompts, settings):
        from alignloop.generation.common import Sample, render
        from alignloop.generation.logprobs import token_logprobs

        ids = [[17, 250, 33, 901, 5, 64]] * len(prompts)
        logprobs = token_logprobs(self.scorer, render(self.tokenizer, prompts), ids,
                                  pad_id=self.tokenizer.pad_token_id)
        return [[Sample(text="", token_ids=t, logprobs=lp, finish_reason="length")]
                for t, lp in zip(ids, logprobs)]


def test_guard_is_forced_for_expert_adapters_and_catches_a_dropped_one(tiny, tmp_path):
    from transformers import AutoTokenizer

    from alignloop.generation.backends import LogprobGuard, must_guard
    from alignloop.generation.common import SamplingSettings, resolve_model
    from alignloop.generation.config import GenerationConfig
    from alignloop.generation.logprobs import StalePolicyError
    from alignloop.generation.vllm_engine import engine_args

    path = tiny("qwen3_moe")
    model = adapted(path)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    assert must_guard("vllm", adapter) and must_guard("vllm_server", adapter)
    assert not must_guard("hf", adapter) and not must_guard("vllm", path)
    args = engine_args(GenerationConfig(), resolve_model(adapter), "float32", cpu=True)
    assert args["enable_lora"] and args["enable_mixed_moe_lora_format"]

    prompts = [[{"role": "user", "content": "What is 12 plus 30?"}], [{"role": "user", "content": "Hi"}]]
    settings = SamplingSettings(n=1, max_new_tokens=6)
    served = LogprobGuard(_FakeGenerator(model, tokenizer), adapter, 1e-3, check_samples=2)
    served.generate(prompts, settings)
    assert served.checks[0]["ok"] and served.checks[0]["max_abs_diff"] < 1e-4
    dropped = LogprobGuard(_FakeGenerator(load(path), tokenizer), adapter, 1e-3, check_samples=2)
    with pytest.raises(StalePolicyError, match="the base without the adapter"):
        dropped.generate(prompts, settings)
