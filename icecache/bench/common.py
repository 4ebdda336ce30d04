"""Shared benchmark plumbing: output files, tables, prompt text."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def replace_block(text: str, start: str, end: str, body: str) -> str:
    """`text` with what lies between the marker lines `start` and `end` replaced by `body` (the README's
    generated blocks)."""
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; `columns` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("-" * (len(h) + 2) for _, h, _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, header, spec in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
                continue
            cells.append(format(value, spec) if isinstance(value, (int, float)) and spec else str(value))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def prompt_ids(tokenizer, tokens: int, prose: str | None = None, offset: int = 0) -> torch.Tensor:
    """`[1, tokens]` token ids of real prose (default: pydoc_data topics) starting `offset` paragraphs in."""
    from ..tasks import default_prose

    text = prose if prose is not None else default_prose()
    paragraphs = text.split("\n")
    text = "\n".join(paragraphs[offset % len(paragraphs):] + paragraphs[: offset % len(paragraphs)])
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(f"the prose holds only {ids.shape[1]} tokens; need {tokens}")
    return ids[:, :tokens]


#: model shapes for timing with random weights (Llama architecture); accuracy needs the embedded model
RANDOM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def random_model(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 layers: int | None = None):
    """A Llama model of a named shape (`RANDOM_SHAPES`) with random weights, for timing only."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"shape must be one of {sorted(RANDOM_SHAPES)}, got {shape!r}")
    config = LlamaConfig(**{**RANDOM_SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                         max_position_embeddings=131072, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()
