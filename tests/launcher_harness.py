"""A running text-generation-launcher for the process tests, the limits its end-to-end runs
serve with, and the transformers greedy reference they are checked against.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

# ---- the launcher as a process ------------------------------------------------------------------


class Launcher:
    """A running text-generation-launcher; its stderr collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shardline.launcher.cli", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if text in line), None)
            if found is not None:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.lines))

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def child_pids(self) -> list[int]:
        return [int(e["pid"]) for e in self.events() if str(e["message"]).endswith(" started")]

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


# ---- end to end: the real shards and router -----------------------------------------------------

LIMITS = ["--max-input-tokens", "128", "--max-total-tokens", "512"]
LIMITS += ["--max-batch-prefill-tokens", "512", "--kv-cache-bytes", str(64 << 20)]


def transformers_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs.input_ids.shape[1] :].tolist()
