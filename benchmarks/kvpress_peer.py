"""Peer rows for the task table: NVIDIA kvpress presses on the same tasks, model and budgets.

kvpress pins transformers < 5.3, so this runs in its own environment (`./scripts/setup_kvpress.sh`):

    .venv-kvpress/bin/python benchmarks/kvpress_peer.py --out benchmarks

It writes `tasks_peers.json`; `icecache bench tasks --out benchmarks` then merges its rows into the
task table. Each press compresses the context to the same number of tokens per head as an icecache
budget (`compression_ratio = 1 - budget / context_tokens`), through kvpress's own pipeline; a
"kvpress no press" row is full KV through the same pipeline, the reference for these rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kinds", nargs="+", default=["passkey", "multikey", "multivalue", "vartrack"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    from kvpress import ExpectedAttentionPress, SnapKVPress, StreamingLLMPress
    from transformers import pipeline

    from icecache.bench.tasks import NEW_TOKENS
    from icecache.models import load_default
    from icecache.tasks import TaskBuilder

    model, tokenizer = load_default()
    # icecache's task prompts are plain text ending in an answer prefix; keep kvpress on the same format
    tokenizer.chat_template = None
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    builder = TaskBuilder(tokenizer)
    tasks = [builder.build(kind, args.seed + 1000 * i + j, context, depth)
             for i, kind in enumerate(args.kinds) for context in args.contexts for j, depth in enumerate(args.depths)]
    presses = {"SnapKV": SnapKVPress, "StreamingLLM": StreamingLLMPress, "ExpectedAttention": ExpectedAttentionPress}
    records = []
    for task in tasks:
        context_tokens = len(tokenizer(task.context).input_ids)
        runs = [("kvpress no press", None, None)] + [
            (f"kvpress {name}", budget, cls(compression_ratio=max(0.0, 1 - budget / context_tokens)))
            for name, cls in presses.items() for budget in args.budgets]
        for method, budget, press in runs:
            start = time.perf_counter()
            question, _, answer_prefix = task.question.partition("? ")
            with torch.no_grad():
                answer = pipe(task.context, question=question + "?", answer_prefix=answer_prefix, press=press,
                              max_new_tokens=NEW_TOKENS[task.kind])["answer"]
            records.append({"method": method, "budget": budget, "kind": task.kind, "context": task.context_tokens,
                            "prompt_tokens": context_tokens, "depth": task.depth, "correct": task.score(answer),
                            "answers": task.answers, "output": answer, "seconds": time.perf_counter() - start})
            print(method, budget, task.kind, task.context_tokens, task.depth, records[-1]["correct"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks_peers.json").write_text(json.dumps({"records": records}, indent=1))


if __name__ == "__main__":
    main()
