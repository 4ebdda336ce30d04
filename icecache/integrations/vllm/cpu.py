"""icecache's vLLM backend on the CPU: `CPU_ATTN` with sparse decode rows.

vLLM's CPU platform always picks `CPU_ATTN`; the plugin registers this subclass in its place. Without
`additional_config["icecache"]` every method is vLLM's own. With it:

    builder (once per step)  -> vLLM's metadata for the whole batch, plus an `EngineStep` (which rows decode,
                                which start or end a request) and vLLM's metadata for the dense rows alone
    impl (per layer)         -> dense rows (prompts, prompt chunks): vLLM's CPU attention over its paged cache
                             -> every row's new K/V into its request's `SparseLayer`; decode rows attend to
                                sink + window + retrieved pages (`RequestLayers.forward`)

vLLM keeps the full KV in its own paged cache, as always (and writes it in `do_kv_cache_update`, unchanged):
icecache saves attention reads and compute per decode step, not memory, in this version.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass, fields

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ...runtime.requests import EngineStep, RequestLayers, RequestTracker
from . import CONFIG_KEY, PREFIX_CACHING_ERROR, runtime_from_config

logger = init_logger(__name__)


@dataclass
class IceCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata for the whole batch (what dense layers use), plus what sparse layers need.

    Attributes:
        icecache: the step's rows and released requests.
        dense: vLLM's metadata for the dense rows alone (prompts and prompt chunks), which follow the decode
            rows; None when there are none.
        dense_start: the flat-batch token where the dense rows begin.
    """

    icecache: EngineStep | None = None
    dense: CPUAttentionMetadata | None = None
    dense_start: int = 0


class StepTimer:
    """Attention seconds per engine step, over every layer (stock and icecache alike), appended as JSON lines
    to `ICECACHE_VLLM_STEP_TIMES` when that is set (the benchmark sets it); otherwise off and free."""

    def __init__(self, path: str | None) -> None:
        self.path, self.step, self.seconds = path, None, 0.0
        self.owner = None  # the metadata builder whose builds mark the steps
        if path:
            atexit.register(self.flush)

    def begin(self, requests: int, tokens: int, decode_only: bool, max_seq_len: int) -> None:
        """A step starts (its metadata is built): the previous one ended."""
        self.flush()
        self.step, self.seconds = {"requests": requests, "tokens": tokens, "decode": decode_only,
                                   "max_seq_len": max_seq_len}, 0.0
        self.started = time.perf_counter()

    def flush(self) -> None:
        # a step's time runs from its metadata build to the next one's (sampling and scheduling included)
        if self.path and self.step is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**self.step, "attention_seconds": self.seconds,
                                    "step_seconds": time.perf_counter() - self.started}) + "\n")
        self.step = None


STEP_TIMER = StepTimer(os.environ.get("ICECACHE_VLLM_STEP_TIMES"))


def _require_no_prefix_caching(config: VllmConfig) -> None:
    # a cached prefix shares KV blocks between requests, and icecache knows a request by its first block. The
    # scheduler that decides it runs in the engine process, which no backend code reaches: say how to turn it off
    if config.cache_config.enable_prefix_caching:
        raise ValueError(PREFIX_CACHING_ERROR)


class IceCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = runtime_from_config(vllm_config.additional_config)
        self.tracker = RequestTracker()
        if STEP_TIMER.owner is None:
            STEP_TIMER.owner = self
        if self.runtime is not None:
            _require_no_prefix_caching(vllm_config)
            self.reorder_batch_threshold = 1  # decode rows first, then prompts: the dense rows are one slice

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if STEP_TIMER.path and STEP_TIMER.owner is self:  # one builder per KV cache group: the first marks steps
            STEP_TIMER.begin(common_attn_metadata.num_reqs, common_attn_metadata.num_actual_tokens,
                             common_attn_metadata.max_query_len == 1, common_attn_metadata.max_seq_len)
        if self.runtime is None or self.window_size != -1:  # icecache off, or a group of sliding layers only
            return meta
        common = common_attn_metadata
        n = common.num_reqs
        step = self.tracker.step(common.block_table_tensor[:n].cpu().numpy(), common.query_start_loc_cpu[: n + 1].tolist(),
                                 common.seq_lens[:n].cpu().tolist(), self.block_size)
        if STEP_TIMER.step is not None and STEP_TIMER.owner is self:
            STEP_TIMER.step.update(sparse_rows=len(step.decode_rows), dense_rows=len(step.dense_rows))
        first_dense = next((r for r, row in enumerate(step.rows) if not row.decode), n)
        dense, dense_start = None, 0
        if first_dense < n:
            if any(row.decode for row in step.rows[first_dense:]):  # not reordered: attend every row densely
                first_dense = 0
            dense_start = step.rows[first_dense].start
            dense = meta if first_dense == 0 else super().build(0, _rows_from(common, first_dense), fast_build)
        return IceCPUMetadata(**{f.name: getattr(meta, f.name) for f in fields(CPUAttentionMetadata)},
                              icecache=step, dense=dense, dense_start=dense_start)


def _rows_from(common: CommonAttentionMetadata, first: int) -> CommonAttentionMetadata:
    """The batch's requests `first ..` as a batch of their own (query offsets rebased to 0)."""
    n = common.num_reqs
    token0 = int(common.query_start_loc_cpu[first])
    qsl_cpu = common.query_start_loc_cpu[first: n + 1] - token0
    qsl = common.query_start_loc[first: n + 1] - token0
    return common.replace(
        query_start_loc=qsl, query_start_loc_cpu=qsl_cpu, seq_lens=common.seq_lens[first:n], num_reqs=n - first,
        num_actual_tokens=int(qsl_cpu[-1]), max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()),
        max_seq_len=int(common.seq_lens[first:n].max()), block_table_tensor=common.block_table_tensor[first:n],
        slot_mapping=common.slot_mapping[token0: int(common.query_start_loc_cpu[n])],
        causal=common.causal[first:n] if isinstance(common.causal, torch.Tensor) else common.causal,
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)


class IceCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with icecache's sparse decode on the layers `IceRuntime` would make sparse."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = get_current_vllm_config()
        self.runtime = runtime_from_config(config.additional_config)
        if self.runtime is not None:
            _require_no_prefix_caching(config)
            if self.logits_soft_cap:  # the sparse rows score by a plain softmax, as IceRuntime does
                raise ValueError(f"this model soft-caps its attention logits (logits_soft_cap={self.logits_soft_cap}, "
                                 "as Gemma 2 does), which icecache does not support; serve it without "
                                 f"additional_config['{CONFIG_KEY}']")
        self.requests: RequestLayers | None = None  # sparse layers only, made at the first forward
        self._sparse: bool | None = None  # decided at the first forward, once the layer's name is known

    def _is_sparse(self, layer) -> bool:
        if self._sparse is None:
            self._sparse = (self.runtime is not None and self.attn_type == AttentionType.DECODER
                            and self.sliding_window == -1 and self.kv_sharing_target_layer_name is None
                            and extract_layer_index(layer.layer_name) >= self.runtime.dense_layers)
        return self._sparse

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if STEP_TIMER.step is None or attn_metadata is None:
            return self._forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        start = time.perf_counter()
        try:
            return self._forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        finally:
            STEP_TIMER.seconds += time.perf_counter() - start

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale):
        step = getattr(attn_metadata, "icecache", None)
        if step is None or not self._is_sparse(layer):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if attn_metadata.dense is not None:  # prompt rows: vLLM's own attention over its paged cache
            start = attn_metadata.dense_start
            super().forward(layer, query[start:], key[start:], value[start:], kv_cache, attn_metadata.dense,
                            output[start:], output_scale, output_block_scale)
        if self.requests is None:
            runtime, kv_heads, head_dim = self.runtime, self.num_kv_heads, self.head_size
            dtype, device = query.dtype, query.device
            self.requests = RequestLayers(lambda: runtime._make_layer(kv_heads, head_dim, dtype, device))
        tokens = attn_metadata.num_actual_tokens
        self.requests.forward(step, query[:tokens].view(tokens, self.num_heads, self.head_size),
                              key[:tokens].view(tokens, self.num_kv_heads, self.head_size),
                              value[:tokens].view(tokens, self.num_kv_heads, self.head_size), self.scale,
                              output[:tokens].view(tokens, self.num_heads, self.head_size))
        return output


class IceCPUAttentionBackend(CPUAttentionBackend):
    """`CPU_ATTN` with icecache's impl and builder (vLLM's own behaviour unless icecache is configured)."""

    @staticmethod
    def get_impl_cls() -> type[IceCPUAttentionImpl]:
        return IceCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[IceCPUMetadataBuilder]:
        return IceCPUMetadataBuilder
