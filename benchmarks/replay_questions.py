"""Replay chosen questions of `icecache bench tasks` (same seeds, depths and haystacks) with index variants
beside each other on one shared prefill per question; prints each variant's output and the counts.

    .venv/bin/python benchmarks/replay_questions.py --model gemma3-270m --context 16384 --kind multikey \
        --questions 10 --pick 0 3 5 7 --variants tree tree:span_lead=2 tree:span_lead=4 --budgets 64 256
"""

from __future__ import annotations

import argparse

from icecache.index import parse_index_spec
from icecache.bench.tasks import NEW_TOKENS, suite_question
from icecache.models import load_model, model_spec
from icecache.runtime import IceRuntime, generate_after_prefill, shared_prefill
from icecache.tasks import TASK_KINDS, TaskBuilder, prose_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--kind", default="passkey", choices=TASK_KINDS)
    parser.add_argument("--kinds", nargs="+", default=["passkey", "multikey"],
                        help="the bench run's --kinds (the question seeds depend on the kind's place)")
    parser.add_argument("--questions", type=int, default=10, help="the bench run's --questions")
    parser.add_argument("--pick", type=int, nargs="+", required=True, help="question numbers 0 .. questions - 1")
    parser.add_argument("--sources", nargs="+", default=["pydoc", "numpy"])
    parser.add_argument("--variants", nargs="+", default=["tree"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default: the budget rule's)")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    frame = "inline" if model_spec(args.model).instruct else "qa"
    builders = {s: TaskBuilder(tokenizer, prose_source(s), frame) for s in args.sources}
    variants = {spec: parse_index_spec(spec) for spec in args.variants}
    counts = {(spec, b): 0 for spec in variants for b in args.budgets}
    for j in args.pick:
        asked = suite_question(args.kinds, args.kind, j, args.questions, args.seed, args.sources, args.context)
        source = asked.source
        task = builders[source].build(asked.kind, asked.seed, asked.context, asked.depth)
        ids = tokenizer(task.prompt, return_tensors="pt").input_ids
        base, first = shared_prefill(model, ids, max(args.budgets))
        line = [f"question {j} ({source}) {task.answers}:"]
        for spec, (name, options) in variants.items():
            donor = IceRuntime(index=name, budget=max(args.budgets), page_size=args.page_size,
                               index_options=options).new_cache(model, prefill=base)
            for budget in args.budgets:
                cache = IceRuntime(index=name, budget=budget, page_size=args.page_size, index_options=options).new_cache(model, prefill=donor)
                out = generate_after_prefill(model, cache, ids, first, NEW_TOKENS[task.kind])[0]
                text = tokenizer.decode(out, skip_special_tokens=True)
                counts[(spec, budget)] += task.score(text)
                line.append(f"{spec}@{budget}={'ok' if task.score(text) else repr(text[:14])}")
        print(" ".join(line), flush=True)
    for (spec, budget), n in counts.items():
        print(f"{spec} @ {budget}: {n} of {len(args.pick)}")


if __name__ == "__main__":
    main()
