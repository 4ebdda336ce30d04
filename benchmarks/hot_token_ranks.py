"""Which attention does an index's page choice keep at the decode steps that decide an answer?

For one question of `icecache bench tasks` (same seeds, depths and haystacks as the suite, as in
`replay_questions.py`), decodes with one index (`--index`, the tree by default) and, at the first `--steps` decode
steps of every sparse layer and KV head, scores the step's query against every stored key (full attention, the
mean over the head's query group). It prints: the share of the indexed tokens' attention that the chosen pages
hold, beside the best pages of the index's own layout (a perfect search over it), the best token-order pages
(what `exact` holds) and the best single tokens; how many tokens of the answer (and of `--track` strings, say
another needle's value) sink, window and chosen pages hold, where they draw at least `--min-prob`; and, where
the chosen pages miss a head's hottest indexed token holding at least `--min-prob`, that token's page and, for
the tree, the page's rank by centroid score (`max_g q_g . c`, what picks most candidates), by the radius bound
`q . c + |q| r` (what picks `bound_candidates` more) and by a per-dimension box bound (Quest's
`sum_j max(q_j min_j, q_j max_j)`, which the tree does not use).

    .venv/bin/python benchmarks/hot_token_ranks.py --context 4096 --kind multikey --questions 15 --pick 6 \
        --sources torch --budget 256 --track 1011667
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from icecache.bench.tasks import NEW_TOKENS, suite_question
from icecache.index import parse_index_spec
from icecache.models import load_model, model_spec
from icecache.runtime import IceRuntime, generate_after_prefill, shared_prefill
from icecache.runtime.layer import SparseLayer
from icecache.tasks import TASK_KINDS, TaskBuilder, prose_source


def page_scores(index, head: int, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every page's score `[pages]` of the tree `index`'s KV head `head` for `queries` `[g, d]` (max over the
    group), three ways: centroid (bfloat16, as the search scans them), radius bound, box bound. Empty pages
    score -inf."""
    pages = index.num_pages
    centroid = queries @ index._cent[head, :, :pages].float()  # [g, pages]
    radii = torch.from_numpy(index._nodes.radii[head][index._nodes.page_node[head, :pages]]).float()
    keys = index._page_keys[head, :pages, :, : index.head_dim]  # [pages, page_size, d]
    held = (index._table[head, :pages] >= 0).unsqueeze(-1)
    low = torch.where(held, keys, torch.full_like(keys, float("inf"))).amin(1)
    high = torch.where(held, keys, torch.full_like(keys, float("-inf"))).amax(1)
    box = torch.stack([torch.maximum(q * low, q * high).sum(-1) for q in queries])
    empty = index._fill[head, :pages] == 0
    scores = {"centroid": centroid, "radius bound": centroid + queries.norm(dim=-1, keepdim=True) * radii,
              "box bound": box}
    return {name: values.max(0).values.masked_fill(empty, -float("inf")) for name, values in scores.items()}


def page_ranks(index, head: int, queries: torch.Tensor, page: int) -> dict[str, int]:
    """Rank (0 = first) of `page` among the tree's pages by each of `page_scores`."""
    return {name: int((values > values[page]).sum()) for name, values in page_scores(index, head, queries).items()}


def mass_shares(index, head: int, indexed: torch.Tensor, chosen: torch.Tensor, max_pages: int) -> dict[str, float]:
    """Shares of one head's attention over the indexed tokens (`indexed` `[n]`, probabilities under full
    attention) held by: the pages the search chose (`chosen`, -1 padded), the best `max_pages` pages of the
    index's own layout (what a perfect search over it would hold), the best `max_pages` token-order pages
    (what `exact` holds) and the best `max_pages * page_size` single tokens (the ceiling)."""
    total = float(indexed.sum())
    table = index.page_table[head]
    page_mass = torch.where(table >= 0, indexed[table.clamp(min=0)], torch.zeros(())).sum(1)
    ps = index.page_size
    ordered = torch.nn.functional.pad(indexed, (0, -indexed.numel() % ps)).view(-1, ps).sum(1)
    chosen = chosen[chosen >= 0]
    return {"search": float(page_mass[chosen].sum()) / total,
            "layout": float(page_mass.topk(min(max_pages, page_mass.numel())).values.sum()) / total,
            "token order": float(ordered.topk(min(max_pages, ordered.numel())).values.sum()) / total,
            "tokens": float(indexed.topk(min(max_pages * ps, indexed.numel())).values.sum()) / total}


@contextmanager
def watch_steps(steps: int, min_prob: float, rows: list, shares: list, tracked: dict | None = None):
    """Record, for the first `steps` decode steps of every sparse layer, each KV head's hottest indexed token
    that the step's pages missed, if it holds at least `min_prob` of the head's attention (into `rows`), and
    each head's `mass_shares` (into `shares`); with `tracked` (name -> global token positions), also how many of
    each name's tokens sink, window and chosen pages hold and the attention on them (into each share row)."""
    original = SparseLayer.step
    seen: dict[int, int] = {}

    def step(layer, query, scale=None):
        out, plan = original(layer, query, scale)
        count = seen[id(layer)] = seen.get(id(layer), 0) + 1
        if count > steps:
            return out, plan
        n, sink, window = layer.num_tokens, layer.budget.sink, layer.budget.window
        queries = query.view(layer.kv_heads, -1, layer.head_dim).float()
        keys = layer.host.k[:, :n].float()
        probs = torch.softmax(torch.einsum("hgd,hnd->hgn", queries, keys) * layer.scale, -1).mean(1)  # [kv, n]
        index = layer.index
        tree = hasattr(index, "_token_page")  # other indexes: token-order pages, no centroids to rank by
        for head in range(layer.kv_heads):
            indexed = probs[head, sink: n - window]
            share = {"step": count, "layer": layer.layer_number, "head": head,
                     **mass_shares(index, head, indexed, plan.page_ids[head], layer.budget.max_pages)}
            if tracked:
                held = torch.zeros(n, dtype=torch.bool)
                held[:sink] = True
                held[n - window:] = True
                pages = plan.page_ids[head][plan.page_ids[head] >= 0]
                local = index.page_table[head, pages].flatten()
                held[local[local >= 0] + sink] = True
                for name, positions in tracked.items():
                    share[name] = (int(held[positions].sum()), len(positions), float(probs[head, positions].sum()))
            shares.append(share)
            token = int(indexed.argmax())  # local position in the index
            page = int(index._token_page[head, token]) if tree else token // index.page_size
            chosen = plan.page_ids[head]
            if float(indexed[token]) < min_prob or page in chosen[chosen >= 0].tolist():
                continue
            rows.append({"step": count, "layer": layer.layer_number, "head": head, "token": token + sink,
                         "pinned": page < getattr(index, "_pinned", 0),
                         "prob": float(indexed[token]), "page": page,
                         "fill": int((index.page_table[head, page] >= 0).sum()),
                         **(page_ranks(index, head, queries[head], page) if tree else {})})
        return out, plan

    SparseLayer.step = step
    try:
        yield
    finally:
        SparseLayer.step = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--kind", default="multikey", choices=TASK_KINDS)
    parser.add_argument("--kinds", nargs="+", default=["passkey", "multikey", "twohop"],
                        help="the bench run's --kinds (the question seeds depend on the kind's place)")
    parser.add_argument("--questions", type=int, default=15, help="the bench run's --questions")
    parser.add_argument("--pick", type=int, required=True, help="question number 0 .. questions - 1")
    parser.add_argument("--sources", nargs="+", default=["pydoc", "numpy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", default="tree",
                        help="an index spec, e.g. tree:bound_candidates=48 (page ranks: the tree only)")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="decode steps to watch")
    parser.add_argument("--min-prob", type=float, default=0.05, help="report missed tokens holding at least this")
    parser.add_argument("--track", nargs="*", default=[],
                        help="strings of the prompt (say, another needle's value) whose tokens to follow per step and "
                             "head, beside the answers'")
    args = parser.parse_args()
    name, options = parse_index_spec(args.index)
    model, tokenizer = load_model(args.model)
    frame = "inline" if model_spec(args.model).instruct else "qa"
    asked = suite_question(args.kinds, args.kind, args.pick, args.questions, args.seed, args.sources, args.context)
    source = asked.source
    task = TaskBuilder(tokenizer, prose_source(source), frame).build(asked.kind, asked.seed, asked.context, asked.depth)
    encoded = tokenizer(task.prompt, return_tensors="pt", return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping[0].tolist()
    tracked = {}
    for text in [*task.answers, *args.track]:
        start = task.prompt.find(text)  # the first occurrence: a needle's value appears once
        if start < 0:
            parser.error(f"--track: {text!r} is not in the prompt")
        tracked[text] = torch.tensor([i for i, (a, b) in enumerate(offsets) if a < start + len(text) and b > start])
    base, first = shared_prefill(model, ids, args.budget)
    runtime = IceRuntime(index=name, budget=args.budget, index_options=options)
    cache = runtime.new_cache(model, prefill=base)
    for number, layer in enumerate(cache.layers):
        for row in getattr(layer, "rows", []):
            row.layer_number = number
    rows: list[dict] = []
    shares: list[dict] = []
    with watch_steps(args.steps, args.min_prob, rows, shares, tracked):
        out = generate_after_prefill(model, cache, ids, first, NEW_TOKENS[task.kind])[0]
    text = tokenizer.decode(out, skip_special_tokens=True)
    index = cache.layers[-1].rows[0].index
    pages = index.num_pages
    print(f"question {args.pick} ({source}, {ids.shape[1]} tokens) {task.answers}: {args.index}@{args.budget} "
          f"{'ok' if task.score(text) else repr(text[:20])}; ~{pages} pages per head, "
          + (f"{index.options.candidate_factor} x pages asked (min {index.options.min_candidates}) + pinned by "
             f"centroid, {index.options.bound_candidates} by radius bound" if name == "tree" else f"index {name}"))
    names = ("search", "layout", "token order", "tokens")
    print("\nShare of the indexed tokens' attention held, mean over sparse layers and KV heads (and the 5 heads "
          "where the search holds least):")
    print("| step | chosen pages | best pages of the index's layout | best token-order pages | best single tokens "
          "| lowest heads (layer.head: chosen / its layout / token order) |")
    print("|---|---|---|---|---|---|")
    for step in sorted({r["step"] for r in shares}):
        at = [r for r in shares if r["step"] == step]
        means = " | ".join(f"{sum(r[k] for r in at) / len(at):.3f}" for k in names)
        low = sorted(at, key=lambda r: r["search"])[:5]
        worst = ", ".join(f"{r['layer']}.{r['head']}: {r['search']:.2f} / {r['layout']:.2f} / "
                          f"{r['token order']:.2f}" for r in low)
        print(f"| {step} | {means} | {worst} |")
    print("\nTokens of the answer (and --track) that sink, window and the chosen pages hold (held / tokens, the "
          f"attention on all of them), per step, layer and KV head where they draw at least {args.min_prob}:")
    print("| step | layer.head | " + " | ".join(f"`{t}`" for t in tracked) + " |")
    print("|---|---|" + "---|" * len(tracked))
    for r in shares:
        if max(r[t][2] for t in tracked) < args.min_prob:
            continue
        print(f"| {r['step']} | {r['layer']}.{r['head']} | " + " | ".join(
            f"{r[t][0]} / {r[t][1]}, {r[t][2]:.3f}" for t in tracked) + " |")
    print(f"\nMissed hottest indexed tokens holding >= {args.min_prob} of a head's attention:")
    print("| step | layer | head | token | prob | page (fill) | rank: centroid | radius bound | box bound |")
    print("|---|---|---|---|---|---|---|---|---|")  # a pinned page (span or first hot tier) is always rescored
    for r in rows:
        print(f"| {r['step']} | {r['layer']} | {r['head']} | {r['token']} | {r['prob']:.3f} | {r['page']} ({r['fill']})"
              f"{', pinned' if r['pinned'] else ''} "
              "| " + " | ".join(str(r.get(k, "-")) for k in ("centroid", "radius bound", "box bound")) + " |")


if __name__ == "__main__":
    main()
