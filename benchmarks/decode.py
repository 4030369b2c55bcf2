"""Decode speed, side by side in one run on the same model:

1. athanor batch-1 decode tok/s vs transformers `generate()` (greedy, KV cache, same weights);
2. athanor aggregate tok/s with 8 concurrent streams vs 1;
3. speculative (draft + target) vs plain greedy decode, on prompts from the run's held-out split.

    python benchmarks/decode.py runs/speedrun            # the draft is runs/speedrun/draft (the speedrun distills it)
    python benchmarks/decode.py runs/speedrun --compile  # athanor with its compiled decode steps

athanor runs its fast path (serve/fast.py); `--compile` adds its compiled steps (batch 1, all rows
of a batch, greedy speculative rounds), compiled in a first untimed round (its time is printed).

Rounds alternate the contenders so machine noise falls on both; medians are printed.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch

from athanor.model.hf import load_pretrained
from athanor.serve.engine import Engine
from athanor.serve.measure import engine_run, speculative_vs_plain
from athanor.serve.stage import PROMPTS, SPECULATIVE_K
from athanor.tokenizer import Tokenizer
from athanor.train.draft import held_out_prompts


@torch.no_grad()
def hf_decode_tok_s(hf_model, prompt: list[int], tokens: int) -> float:
    """transformers' decode rate: (tokens - 1) / (time for `tokens` - time for 1), greedy, no early stop."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t = time.perf_counter()
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    first = timed(1)
    return (tokens - 1) / (timed(tokens) - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="target model run directory")
    ap.add_argument("--draft", type=Path, default=None, help="draft run directory (default RUN_DIR/draft)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--k", type=int, default=SPECULATIVE_K,
                    help=f"draft tokens proposed per target forward (default {SPECULATIVE_K}, as the speedrun)")
    ap.add_argument("--compile", action="store_true",
                    help="athanor with its compiled (AOTInductor) decode steps")
    ap.add_argument("--spec-prompts", type=int, default=8, help="held-out prompts for the speculative comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    target = load_pretrained(args.run_dir)
    draft = load_pretrained(args.draft or args.run_dir / "draft")
    hf = AutoModelForCausalLM.from_pretrained(args.run_dir, dtype=torch.float32).eval()
    tok = Tokenizer.load(args.run_dir)
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    # The draft is distilled on the target's continuations of training-split prompts: measure it on
    # windows of the held-out split, which neither model saw.
    spec_prompts = held_out_prompts(args.run_dir, args.spec_prompts, tok.encode_prompt(""))
    rows: dict[str, list[float]] = collections.defaultdict(list)
    engine1, engine8 = (Engine(target, max_batch=b, compile=args.compile) for b in (1, 8))

    def one_round() -> dict[str, float]:
        one = engine_run(engine1, prompts[:1], args.tokens)
        hf_b1 = hf_decode_tok_s(hf, prompts[0], args.tokens)
        eight = engine_run(engine8, prompts[:8], args.tokens)
        spec = speculative_vs_plain(target, draft, spec_prompts, args.tokens, k=args.k, compile=args.compile)
        assert spec.identical, "speculative greedy output differs from plain greedy output"
        return {"athanor b1": one.decode_tok_s, "hf b1": hf_b1, "athanor 1 stream": one.aggregate_tok_s,
                "athanor 8 streams": eight.aggregate_tok_s, "plain": spec.plain_tok_s,
                "speculative": spec.speculative_tok_s, "acceptance": spec.acceptance,
                "tokens/round": spec.tokens_per_round}

    if args.compile:  # a first, untimed round compiles every graph the rounds use
        t = time.perf_counter()
        one_round()
        print(f"compile (cold, every graph of both models) and one round: {time.perf_counter() - t:.1f} s")
    for _ in range(args.rounds):
        for key, value in one_round().items():
            rows[key].append(value)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"threads {torch.get_num_threads()}, {args.tokens} tokens per stream, {args.rounds} rounds (medians), "
          f"k={args.k}, {'compiled' if args.compile else 'eager'} decode steps")
    print(f"batch-1 decode:    athanor {med['athanor b1']:8.0f} tok/s | transformers generate() "
          f"{med['hf b1']:8.0f} tok/s | ratio {med['athanor b1'] / med['hf b1']:.2f}x")
    print(f"concurrency:       8 streams {med['athanor 8 streams']:8.0f} tok/s | 1 stream "
          f"{med['athanor 1 stream']:8.0f} tok/s | ratio {med['athanor 8 streams'] / med['athanor 1 stream']:.2f}x")
    print(f"speculative (T=0): speculative {med['speculative']:6.0f} tok/s | plain {med['plain']:8.0f} tok/s | "
          f"ratio {med['speculative'] / med['plain']:.2f}x (acceptance {med['acceptance']:.0%}, "
          f"{med['tokens/round']:.2f} tokens per target forward)")
    print(f"speculative prompts: {len(spec_prompts)} windows of {args.run_dir / 'data' / 'val.bin'} (held-out split; "
          f"the draft was distilled on training-split prompts only)")


if __name__ == "__main__":
    main()
