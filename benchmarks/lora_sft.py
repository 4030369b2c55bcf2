"""LoRA SFT step time and peak memory: athanor vs PEFT + TRL's SFTTrainer, side by side.

Same model (a run dir, loaded by both), same LoRA (r, alpha, every linear layer but the head),
same examples per optimizer step (synthetic tasks rendered with the run's chat template and
assistant-only masks), same threads. Each side runs in its own process, so its peak resident
memory (ru_maxrss, imports included) is its own. athanor packs the step's conversations into
rows with a block-diagonal mask; TRL pads them (its default; its padding-free packing needs
FlashAttention to keep conversations apart).

    python benchmarks/lora_sft.py --base runs/speedrun --steps 8 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def encoded_examples(base: str, n: int, seq_len: int) -> list[dict]:
    from athanor.data.synth import make_splits
    from athanor.tokenizer import Tokenizer

    tok = Tokenizer.load(base)
    train, _, _ = make_splits(n, 1, seed=0)
    out = []
    for t in train[:n]:
        ids, mask = tok.render_chat([{"role": "user", "content": t.prompt}, {"role": "assistant",
                                                                          "content": t.completion}])
        out.append({"input_ids": ids[:seq_len + 1], "assistant_masks": mask[:seq_len + 1]})
    return out


def run_athanor(args: argparse.Namespace) -> list[float]:
    from athanor.model.hf import load_pretrained
    from athanor.model.lora import LoraConfig, apply_lora
    from athanor.tokenizer import Tokenizer
    from athanor.train import dist
    from athanor.train.loop import TrainConfig, Trainer
    from athanor.train.sft import Encoded, SFTStage, pack

    tok = Tokenizer.load(args.base)
    data = encoded_examples(args.base, args.examples_per_step * args.steps, args.seq_len)
    model = load_pretrained(args.base)
    apply_lora(model, LoraConfig(r=args.r, alpha=args.alpha), seed=0)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(max_steps=args.steps, batch_size=1, lr=1e-3, warmup_steps=1, device="cpu",
                          weight_decay=0.0)
        for step in range(args.steps):
            chunk = data[step * args.examples_per_step:(step + 1) * args.examples_per_step]
            rows = pack([Encoded(d["input_ids"], d["assistant_masks"]) for d in chunk], args.seq_len, tok.pad_id, 0)
            stage = SFTStage(rows, None, batch_size=len(rows["x"]), seed=0)
            if step == 0:
                trainer = Trainer(model, stage, cfg, tmp, dist.setup("cpu"), show_progress=False)
            trainer.stage = stage
            t = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t)
    return times


def run_trl(args: argparse.Namespace) -> list[float]:
    import datasets
    import peft
    import transformers
    import trl

    data = encoded_examples(args.base, args.examples_per_step * args.steps, args.seq_len)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.base)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = trl.SFTConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.examples_per_step,
                            learning_rate=1e-3, warmup_steps=1, report_to=[], save_strategy="no", logging_steps=10**6,
                            use_cpu=True, dataloader_num_workers=0, max_length=None, disable_tqdm=True,
                            # TRL's defaults recompute activations and autocast to bf16; athanor does
                            # neither here, so neither does TRL: the same work in the same dtype.
                            gradient_checkpointing=False, bf16=False)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(data),
                                 processing_class=hf_tok,
                                 peft_config=peft.LoraConfig(r=args.r, lora_alpha=args.alpha,
                                                             target_modules="all-linear"),
                                 callbacks=[Timer()])
        trainer.train()
    return times


def side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = (run_athanor if args.side == "athanor" else run_trl)(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/speedrun", help="run dir of the model (also its tokenizer)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side and round (the first is left out)")
    p.add_argument("--examples-per-step", type=int, default=64, help="conversations per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="athanor's packed row length")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--side", choices=["athanor", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        side(args)
        return
    # Alternate the sides round by round so machine noise falls on both; median over every
    # step of every round (the first step of each round, the warm-up, left out).
    times: dict[str, list[float]] = {"athanor": [], "trl": []}
    peak: dict[str, float] = {"athanor": 0.0, "trl": 0.0}
    for _ in range(args.rounds):
        for name in ("athanor", "trl"):
            cmd = [sys.executable, __file__, "--side", name, *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} side failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times[name] += result["times"][1:]
            peak[name] = max(peak[name], result["peak_mb"])
    print(f"LoRA SFT, {args.examples_per_step} conversations/step, r={args.r}, {args.threads} threads, "
          f"median of {args.steps - 1} steps x {args.rounds} rounds")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("athanor", "trl"):
        print(f"  {name:8s} step {med[name] * 1000:8.1f} ms   peak RSS {peak[name]:7.0f} MB")
    print(f"  athanor is {med['trl'] / med['athanor']:.2f}x faster per step, uses "
          f"{peak['athanor'] / peak['trl']:.2f}x the memory")


if __name__ == "__main__":
    main()
