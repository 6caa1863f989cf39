"""Benchmark the OpenAI-compatible gateway against the engine it fronts, in one process.

The same prompts (arithmetic tasks, the demo's tiny Llama built at random in a temp dir) go
(a) straight to ``HFEngine.generate`` as one batch, and (b) through the gateway: B concurrent clients
(threads with the ``openai`` client, real HTTP on loopback) each sending one ``/v1/completions``
request, which the gateway gathers into batched engine calls. B is the number of episodes the agent
mode runs at once (``rollout.agent.concurrency``). As in the agent mode, the B episodes are opened
as live episodes before their clients start (the gateway then knows how many calls to wait for);
``external`` figures are for clients the gateway knows nothing of, each episode named by its bearer
key on its first call. Tokens counted are those generated (sequences end at EOS or
``--max-tokens``); each figure is the median of ``--repeats`` rounds.

``gateway_throughput_fraction`` = gateway tokens/s / direct tokens/s at each B (live episodes, the
agent mode's case; its smallest value over B is the headline figure).
Human-readable lines first; the LAST stdout line is one JSON object.

    python bench/gateway.py [--batches 8 32] [--repeats 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    import openai

    from treeplay.agents.base import TokenIds
    from treeplay.agents.gateway.server import Gateway, GatewayServer
    from treeplay.agents.registry import make_environment
    from treeplay.engines import make_engine
    from treeplay.engines.tiny import build_tiny_model

    model = build_tiny_model(Path(tempfile.mkdtemp(prefix="treeplay-bench-gw-")) / "model", hidden_size=128,
                             num_layers=4, max_positions=128)
    engine = make_engine("hf", model, num_threads=1)
    prompts = [t.prompt for t in make_environment("arithmetic").tasks("train", max(args.batches), seed=0)]
    gateway = Gateway(engine, default_max_tokens=args.max_tokens, max_batch=max(args.batches))
    figures: dict[str, float] = {}
    with GatewayServer(gateway) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=600)
        for b in args.batches:
            batch = prompts[:b]
            ids = [TokenIds(list(engine.tokenizer(p, add_special_tokens=True)["input_ids"])) for p in batch]

            def direct(ids=ids) -> int:
                out = engine.generate(ids, n=1, max_tokens=args.max_tokens, temperature=1.0)
                return sum(len(s[0].token_ids) for s in out)

            def one(p: str, sid: str | None) -> int:
                # One episode per request, named by the bearer key: a live episode opened beforehand
                # (as the agent mode does), or a key the gateway has never seen (an external client).
                key = sid or uuid.uuid4().hex
                r = client.completions.create(model="policy", prompt=p, max_tokens=args.max_tokens, temperature=1.0,
                                              extra_headers={"Authorization": f"Bearer {key}"})
                if sid is not None:
                    gateway.close(sid)
                return r.usage.completion_tokens

            def through_gateway(b=b, batch=batch, live=True) -> int:
                sids = [gateway.open(live=True).sid if live else None for _ in batch]
                with concurrent.futures.ThreadPoolExecutor(max_workers=b) as pool:
                    return sum(pool.map(one, batch, sids))

            def external(b=b, batch=batch) -> int:
                return through_gateway(b, batch, live=False)

            direct(), through_gateway(), external()  # warm every path
            rates: dict[str, list[float]] = {"direct": [], "gateway": [], "external": []}
            batches: dict[str, list[int]] = {"gateway": [], "external": []}
            for _ in range(args.repeats):
                for name, fn in (("direct", direct), ("gateway", through_gateway), ("external", external)):
                    calls = len(gateway.batcher.batch_sizes)
                    t = time.perf_counter()
                    tokens = fn()
                    rates[name].append(tokens / (time.perf_counter() - t))
                    if name in batches:
                        batches[name] += gateway.batcher.batch_sizes[calls:]
            d, g, x = (statistics.median(rates[k]) for k in ("direct", "gateway", "external"))
            figures[f"direct_tokens_per_s_b{b}"] = round(d, 1)
            figures[f"gateway_tokens_per_s_b{b}"] = round(g, 1)
            figures[f"gateway_throughput_fraction_b{b}"] = round(g / d, 3)
            figures[f"external_throughput_fraction_b{b}"] = round(x / d, 3)
            for name, sizes in batches.items():
                figures[f"{name}_mean_engine_batch_b{b}"] = round(sum(sizes) / max(1, len(sizes)), 2)
            print(f"B={b}: direct {d:.0f} tok/s, gateway {g:.0f} tok/s (fraction {g / d:.2f}), "
                  f"external clients {x:.0f} tok/s (fraction {x / d:.2f})")
    engine.close()
    figures["gateway_throughput_fraction"] = min(v for k, v in figures.items() if k.startswith("gateway_throughput_fraction_b"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
