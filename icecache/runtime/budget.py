"""The budget rule, identical for every index: what one KV head may attend to at one decode step."""

from __future__ import annotations

from dataclasses import dataclass

#: the recent window when none is given: 32 tokens, or 16 for budgets under `SMALL_BUDGET` tokens
DEFAULT_WINDOW, SMALL_BUDGET_WINDOW, SMALL_BUDGET = 32, 16, 128
#: tokens per KV page when none is given, at every budget
DEFAULT_PAGE_SIZE = 8


def default_window(tokens: int) -> int:
    """The recent window a budget of `tokens` gets when none is given. Under 128 tokens the window is 16,
    not 32: at budget 64 (sink 16) that leaves two retrieved 16-token pages per KV head instead of one, and
    the task suite kept more of full KV's answers with both the tree and `exact` (benchmarks/RESULTS.md,
    "Budget 64: a smaller window")."""
    return SMALL_BUDGET_WINDOW if tokens < SMALL_BUDGET else DEFAULT_WINDOW


def default_page_size(tokens: int) -> int:
    """The page size a budget of `tokens` gets when none is given: 8 tokens at every budget. Against 16: at
    budget 64, four retrieved pages per KV head instead of two kept more of full KV's answers with the tree
    (89 -> 94 of 101 over 2k-8k); at budgets 128 / 256 on the 8k suite (105 questions) the tree kept 0.92 /
    0.97 of full KV's answers instead of 0.92 / 0.87 (16-token pages cut pass keys at a page edge, `256` for
    `25697`), `exact` 0.92 / 0.95 either way; 4k recall at 256 rose 0.716 -> 0.744. The price: twice the
    pages to score and route (an 8k step at 256 3-6% longer) and ~13% more index memory at 4k
    (benchmarks/RESULTS.md, "Page size 8 at every budget")."""
    return DEFAULT_PAGE_SIZE


def describe_rule(window: int | None, page_size: int | None) -> str:
    """The recorded window and page size as a report names them (None: the budget's default, in words)."""
    window_words = (f"window {window}" if window is not None
                    else f"window {DEFAULT_WINDOW}, {SMALL_BUDGET_WINDOW} under budget {SMALL_BUDGET}")
    page_words = f"page {page_size if page_size is not None else DEFAULT_PAGE_SIZE}"
    return f"{window_words}, {page_words}"


def resolved_rules(budgets, *, sink: int = 16, window: int | None = None,
                   page_size: int | None = None) -> dict[str, dict[str, int]]:
    """The rule each of `budgets` resolves to under these options (None: the budget's default), keyed by the
    budget as a string: `{"64": {"sink": 16, "window": 16, "page_size": 8}, ...}`. Benchmark JSON records it
    as `settings["rules"]`, so a run keeps the rule it applied when a default changes later."""
    return {str(b): {"sink": r.sink, "window": r.window, "page_size": r.page_size}
            for b in budgets for r in [Budget(b, page_size=page_size, sink=sink, window=window)]}


def describe_rules(rules: dict[str, dict[str, int]]) -> str:
    """`resolved_rules` in words, budgets with the same window and page size together: "window 16 and page 8
    at budget 64, window 32 and page 16 at budgets 128 / 256" (one pair for all: "window 32, page 16")."""
    groups: dict[tuple[int, int], list[str]] = {}
    for budget, rule in sorted(rules.items(), key=lambda item: int(item[0])):
        groups.setdefault((rule["window"], rule["page_size"]), []).append(budget)
    if len(groups) == 1:
        (window, page_size), = groups
        return f"window {window}, page {page_size}"
    return ", ".join(f"window {window} and page {page_size} at budget{'s' if len(budgets) > 1 else ''} "
                     f"{' / '.join(budgets)}" for (window, page_size), budgets in groups.items())


@dataclass(frozen=True)
class Budget:
    """`tokens` per KV head per decode step = `sink` first tokens + `window` most recent tokens (always
    resident) + `(tokens - sink - window) // page_size` retrieved pages.

    `window` None (default) takes `default_window(tokens)`: 32, or 16 for budgets under 128; `page_size`
    None (default) takes `default_page_size(tokens)`: 8.
    When every retrievable token fits in `tokens - sink - window`, all pages are kept and nothing is
    searched (so a budget at least the context reproduces dense attention with any index).
    """

    tokens: int = 256
    page_size: int | None = None
    sink: int = 16
    window: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokens, int) and not isinstance(self.tokens, bool):  # frozen: resolved once, here
            if self.window is None:
                object.__setattr__(self, "window", default_window(self.tokens))
            if self.page_size is None:
                object.__setattr__(self, "page_size", default_page_size(self.tokens))
        for name in ("tokens", "page_size", "sink", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{'budget' if name == 'tokens' else name} must be an int, got {value!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (the newest token is always attended), got {self.window}")
        if self.tokens < self.sink + self.window:
            raise ValueError(
                f"budget={self.tokens} is smaller than sink + window = {self.sink} + {self.window}; "
                f"use budget >= {self.sink + self.window} or a smaller sink/window"
            )
        if self.tokens < self.page_size:
            raise ValueError(f"budget={self.tokens} is smaller than one page (page_size={self.page_size})")

    @property
    def retrieval_tokens(self) -> int:
        """Tokens left for retrieved pages after sink and window."""
        return self.tokens - self.sink - self.window

    @property
    def max_pages(self) -> int:
        """Retrieved pages per KV head per step."""
        return self.retrieval_tokens // self.page_size
