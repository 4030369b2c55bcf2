"""Training throughput: athanor's training step vs transformers' LlamaForCausalLM, side by side.

Same config, same weights, same batch, same dtype, same threads, same AdamW; each step is
forward + next-token loss + backward + optimizer step. Rounds alternate between the two to
spread machine noise evenly; medians are reported.

    python benchmarks/train_throughput.py                    # the speedrun's model shape, fp32
    python benchmarks/train_throughput.py --dtype bf16       # bf16 autocast for both
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from athanor.model.hf import config_to_hf
from athanor.model.llama import LlamaModel, ModelConfig
from athanor.train.loop import TrainConfig, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (the same for each)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(512, args.seq))
    ours = LlamaModel(cfg)
    hf_cfg = AutoConfig.for_model(**config_to_hf(cfg))
    theirs = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")
    theirs.load_state_dict(ours.state_dict(), strict=False)
    theirs.tie_weights()
    ours.to(args.device)
    theirs.to(args.device)
    tcfg = TrainConfig()
    opt_ours, opt_theirs = make_optimizer(ours, tcfg), make_optimizer(theirs, tcfg)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    inputs, targets = x[:, :-1], x[:, 1:]
    device_type = torch.device(args.device).type
    amp = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    run_ours = torch.compile(ours) if args.compile else ours
    run_theirs = torch.compile(theirs) if args.compile else theirs

    def step_ours() -> None:
        with amp:
            loss = run_ours(inputs, targets=targets) / targets.numel()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        with amp:
            logits = run_theirs(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().view(-1, args.vocab), targets.reshape(-1))
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    def timed(step) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        return args.batch * args.seq * args.steps / (time.perf_counter() - t)

    for step in (step_ours, step_theirs):  # warm-up: allocator, kernels, autocast caches
        step()
        step()
    rates: dict[str, list[float]] = {"athanor": [], "transformers": []}
    for _ in range(args.rounds):
        rates["athanor"].append(timed(step_ours))
        rates["transformers"].append(timed(step_theirs))
    a, t = statistics.median(rates["athanor"]), statistics.median(rates["transformers"])
    print(f"model {cfg.num_parameters() / 1e6:.1f}M params, batch {args.batch}x{args.seq}, {args.dtype}, "
          f"{args.device}, {args.threads} threads, {'compiled' if args.compile else 'eager'}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"athanor       {a:10,.0f} tokens/s")
    print(f"transformers  {t:10,.0f} tokens/s")
    print(f"ratio         {a / t:10.2f}x")


if __name__ == "__main__":
    main()
