"""DPO step rate and peak memory: athanor's DPO stage vs TRL's DPOTrainer, side by side.

Same model (the speedrun's shape, random weights saved once and loaded by both), same preference
pairs (random token ids of fixed lengths; TRL reads them through a word-level tokenizer that maps
"t123" to id 123, so both score exactly the same tokens), fp32, same threads, the sigmoid (DPO)
loss with beta 0.1, AdamW (fused, betas 0.9/0.999, no weight decay) at a constant learning rate
with no warmup, gradient clipping at 1.0. LoRA: the same r and alpha on every linear layer but the
head (athanor's LoRA; PEFT's "all-linear" for TRL), no dropout.

Reference: precomputed on both sides, before training, by the starting model (with LoRA the base
model with the adapter off): athanor's default, `precompute_ref_log_probs=True` for TRL (TRL's
default instead runs a reference forward in every step). Neither step runs a reference model.
TRL defaults turned off because athanor does not use them here: bf16 autocast
(`bf16=False`), gradient checkpointing, truncation (`max_length=None`; no pair is long enough
to be cut), warmup and the linear decay, logging. Left as TRL does it (no setting turns it off): its fused
LM head also computes each token's entropy, mean logit and top-1 flag for its logged metrics.

Each side runs in its own process, so its memory is its own: "peak" is the process's resident
high-water mark (ru_maxrss, imports and model included); "step peak" is how far the resident set
rose above where it stood when training began (Linux VmHWM, reset through /proc/self/clear_refs
after setup and the reference pass). A step is timed from the end of the previous step to its own
end, batch drawing and collation included, on both sides; the first step of each process is warm-up.

    python benchmarks/dpo.py --threads 1 --rounds 3 --steps 8
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
from pathlib import Path

from side_by_side import add_shape_args, reset_peak, save_speedrun_model, status_mb, trl_step_clock

PAD_ID, EOS_ID = 0, 1  # the two special ids; every other id is an ordinary token


def synthetic_pairs(args: argparse.Namespace) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids, fixed lengths, each answer ending with EOS; a new batch per step."""
    import torch

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, args.vocab, (n,), generator=g).tolist()

    return [(ids(args.prompt_len), ids(args.answer_len - 1) + [EOS_ID], ids(args.answer_len - 1) + [EOS_ID])
            for _ in range(args.pairs * args.steps)]


def run_athanor(args: argparse.Namespace, model_dir: Path) -> dict:
    import torch

    from athanor.data.preferences import EncodedPair
    from athanor.model.hf import load_pretrained
    from athanor.train import dist
    from athanor.train.dpo import PreferenceStage, reference_logps
    from athanor.train.finetune import LoraSettings, maybe_apply_lora
    from athanor.train.loop import TrainConfig, Trainer
    from athanor.train.preference_loss import PreferenceLossConfig

    pairs = [EncodedPair(p, c, [1] * len(c), r, [1] * len(r), None) for p, c, r in synthetic_pairs(args)]
    model = load_pretrained(model_dir)
    ref = reference_logps(model, pairs, PAD_ID, args.pairs)  # before the adapter: the base model
    maybe_apply_lora(model, LoraSettings(enabled=args.mode == "lora", r=args.r, alpha=args.alpha), seed=0)
    stage = PreferenceStage(pairs, ref, [], torch.zeros(0, 2), PreferenceLossConfig(beta=args.beta), PAD_ID,
                            args.pairs, seed=0)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.pairs, lr=args.lr, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, beta2=0.999, grad_clip=1.0, device="cpu", precision="fp32")
    ends, losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, stage, cfg, tmp, dist.setup("cpu"), show_progress=False, name="dpo")
        base = reset_peak()
        ends.append(time.perf_counter())
        for _ in range(args.steps):
            losses.append(trainer.train_step()["loss"])
            ends.append(time.perf_counter())
    return {"ends": ends, "base_mb": base, "ref": ref[:4].tolist(), "mean_loss": statistics.mean(losses)}


def run_trl(args: argparse.Namespace, model_dir: Path) -> dict:
    import datasets
    import peft
    import tokenizers
    import torch
    import transformers
    import trl

    # A word-level tokenizer over "t0".."t{vocab-1}": TRL tokenizes the text back into exactly these ids.
    vocab = {f"t{i}": i for i in range(args.vocab)}
    vocab["<pad>"], vocab["</s>"] = vocab.pop(f"t{PAD_ID}"), vocab.pop(f"t{EOS_ID}")
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
    inv = {i: w for w, i in vocab.items()}

    def text(ids: list[int]) -> str:
        return " ".join(inv[i] for i in ids)

    # Answers already end with the EOS text, so TRL adds none.
    data = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
            for p, c, r in synthetic_pairs(args)]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ends: list[float] = []
    base: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        cfg = trl.DPOConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.pairs, learning_rate=args.lr,
            beta=args.beta, loss_type=["sigmoid"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, seed=0, use_cpu=True, dataloader_num_workers=0,
            report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            # athanor's defaults for this run: the reference precomputed, fp32, no recomputed activations, no
            # truncation (TRL's defaults: a reference forward per step, bf16 autocast, gradient checkpointing).
            precompute_ref_log_probs=True, bf16=False, gradient_checkpointing=False, max_length=None)
        peft_config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear") \
            if args.mode == "lora" else None
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(data),
                                 processing_class=tok, peft_config=peft_config, callbacks=[trl_step_clock(ends, base)])
        ref = [[trainer.train_dataset[i]["ref_chosen_logps"], trainer.train_dataset[i]["ref_rejected_logps"]]
               for i in range(4)]
        out = trainer.train()
    return {"ends": ends, "base_mb": base[0], "ref": ref, "mean_loss": out.training_loss}


def side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_speedrun_model(args, Path(tmp), args.prompt_len + args.answer_len)
        result = (run_athanor if args.side == "athanor" else run_trl)(args, Path(tmp))
    result["step_peak_mb"] = status_mb("VmHWM") - result["base_mb"]
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _without_mode(argv: list[str]) -> list[str]:
    """The command line minus --mode and its value (`--mode full` or `--mode=full`): each side gets one mode."""
    out, skip = [], False
    for a in argv:
        if not skip and not a.startswith("--mode="):
            if a == "--mode":
                skip = True
                continue
            out.append(a)
        else:
            skip = False
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=192, help="tokens of each answer, EOS included")
    p.add_argument("--steps", type=int, default=8, help="steps per side and round (the first is left out)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    add_shape_args(p)
    p.add_argument("--side", choices=["athanor", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        side(args)
        return
    modes = ["full", "lora"] if args.mode == "both" else [args.mode]
    print(f"DPO (sigmoid), {args.pairs} pairs/step of {args.prompt_len} + {args.answer_len} tokens, fp32, "
          f"{args.threads} thread(s), reference precomputed; median of {args.steps - 1} steps x {args.rounds} rounds")
    for mode in modes:
        # Alternate the sides round by round so machine noise falls on both.
        times: dict[str, list[float]] = {"athanor": [], "trl": []}
        peak = {"athanor": 0.0, "trl": 0.0}
        step_peak = {"athanor": 0.0, "trl": 0.0}
        refs, losses = {}, {}
        for _ in range(args.rounds):
            for name in ("athanor", "trl"):
                cmd = [sys.executable, __file__, "--side", name, "--mode", mode, *_without_mode(sys.argv[1:])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} side failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                steps = [b - a for a, b in zip(r["ends"], r["ends"][1:], strict=False)]
                times[name] += steps[1:]
                peak[name] = max(peak[name], r["peak_mb"])
                step_peak[name] = max(step_peak[name], r["step_peak_mb"])
                refs[name], losses[name] = r["ref"], r["mean_loss"]
        med = {k: statistics.median(v) for k, v in times.items()}
        ref_diff = max(abs(a - b) / abs(b) for ra, rb in zip(refs["athanor"], refs["trl"], strict=True)
                       for a, b in zip(ra, rb, strict=True))
        print(f"{mode}: reference log-probs agree within {ref_diff:.1e} relative (first 4 pairs)")
        for name in ("athanor", "trl"):
            print(f"  {name:8s} {1 / med[name]:6.2f} steps/s ({med[name] * 1000:7.1f} ms)   peak RSS "
                  f"{peak[name]:6.0f} MB   step peak +{step_peak[name]:5.0f} MB   mean loss {losses[name]:.4f}")
        print(f"  athanor: {med['trl'] / med['athanor']:.2f}x the step rate, {peak['athanor'] / peak['trl']:.2f}x the "
              f"peak RSS, {step_peak['athanor'] / step_peak['trl']:.2f}x the step peak")


if __name__ == "__main__":
    main()
