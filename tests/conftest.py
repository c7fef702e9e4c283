"""Shared fixtures. Tests never download: the hub is switched off, and the tiny Llama is built
into a per-session cache from the config and corpus that alignloop ships."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads per
# process made one step 35x slower (measured: 3.5 s vs 0.1 s). Subprocess CLI runs inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, which is read when triton is
    # first imported (transformers and TRL import it): set here, before any test module is
    # collected, so that no order of test files can import triton first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def alignloop_cache(tmp_path_factory):
    """A fresh cache for the session: `builtin:tiny` in recipes builds here, subprocesses included."""
    cache = tmp_path_factory.mktemp("alignloop-cache")
    os.environ["ALIGNLOOP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(alignloop_cache):
    from alignloop.models.tiny import build_tiny

    return build_tiny()


@pytest.fixture()
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def kill_at_first_checkpoint(command: list[str], checkpoints, cwd) -> None:
    """Starts `command` (an `alignloop run`) and SIGKILLs it once a complete trainer checkpoint
    (one with trainer_state.json, which transformers writes last) is in `checkpoints`."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, f"the run ended before a checkpoint appeared in {checkpoints}"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
