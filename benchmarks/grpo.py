"""GRPO step rate and peak memory: athanor's GRPO stage vs TRL's GRPOTrainer, side by side.

One step is a whole GRPO iteration: sample G completions for each of a batch of prompts with the
policy being trained, score them with a reward function, compute group advantages, and take one
optimizer step on the batch. Both sides do exactly the same work:

- Same model (the speedrun's shape, random seed-0 weights saved once and loaded by both) and the same
  tokenizer, saved beside it: word-level over "t7".."t{vocab-1}" (id N for "tN") after athanor's seven
  special tokens, with athanor's chat template, so a prompt's text is the same ids on both sides (TRL
  renders it with `apply_chat_template` from the saved `tokenizer_config.json`; the benchmark checks).
- Same prompts: random words of a fixed length, each as one user turn; `--prompts` distinct prompts
  per step, each answered `--group` (G) times, at temperature 1 (no top-k/top-p), on the CPU in fp32.
- Every completion exactly `--completion-len` tokens on both sides, checked and printed: with random
  weights a stop token is sampled now and then, so stopping is switched off. TRL: `min_new_tokens` =
  `max_completion_length` in `generation_kwargs` (transformers masks the EOS logits until then; TRL's
  completion mask is cut at the first EOS, which never comes). athanor: its engine has no minimum
  length; `LocalLM` stops a reply at the tokenizer's `stop_ids` (end of turn, eos, bos, role tokens),
  so the benchmark hands the stage a tokenizer whose `stop_ids` is empty. (The engine's `logit_bias`
  could suppress them instead, but it is applied row by row in Python, a cost the real stage never pays.)
- Same reward: one cheap Python function of the completion's text (the share of its words "tN" with N
  even), so rewards vary within a group; advantages (r - mean) / (std + 1e-4) per group (both defaults).
- Same loss: the token-level ("dapo") clipped loss, epsilon 0.2 both sides of 1, beta 0 (no reference
  model, no KL), `num_iterations` 1, one optimizer step per generation batch: `--micro-batch` rows per
  micro-batch and G x prompts / micro-batch micro-batches accumulated into the step (athanor:
  train.batch_size and train.grad_accum; TRL: per_device_train_batch_size and
  gradient_accumulation_steps, so its steps_per_generation, by default equal to the latter, is one
  generation per step). With one update per batch the sampling policy's log-probs are not needed (the
  ratio is 1); TRL skips that forward, athanor runs one no-grad forward over the batch for its logged
  entropy (part of the stage as it is, so timed here).
- AdamW (fused, betas 0.9/0.999, no weight decay), constant learning rate with no warmup, clipping at 1.0.

TRL defaults turned off because athanor does not use them here: bf16 autocast (`bf16=False`),
gradient checkpointing (GRPOConfig's default is on), vLLM (`use_vllm=False`: generation in-process with
transformers' `generate`, as athanor generates in-process with its engine), the linear decay, logging and
its reporting integrations (`report_to=[]`, `logging_steps` past the run, no completion logging),
checkpoint saving. Left as TRL does it: its training forward also computes each token's entropy (for
its logged metrics), and it moves the model between train and eval modes around generation.

Each side runs in its own process, so its memory is its own: "peak" is the process's resident
high-water mark (ru_maxrss, imports and model included); "step peak" is how far the resident set
rose above where it stood when training began (Linux VmHWM, reset through /proc/self/clear_refs
after setup). A step is timed from the end of the previous step to its own end (generation, rewards
and update) on both sides; the first step of each process is warm-up. Each side also times its
phases: generation (athanor: `LocalLM.generate`; TRL: `_generate`, which includes decoding the text),
scoring (the rest of the rollout: rewards, advantages, athanor's no-grad forward, batching) and
the update (what is left of the step: forward, backward, optimizer).

    python benchmarks/grpo.py --threads 2 --rounds 3 --steps 4
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
from collections.abc import Callable
from pathlib import Path

from side_by_side import add_shape_args, reset_peak, save_speedrun_model, status_mb, trl_step_clock

N_SPECIAL = 7  # athanor's special tokens take ids 0-6; every other id is an ordinary word "tN"


def synthetic_prompts(args: argparse.Namespace) -> list[str]:
    """The user turns: random words, `prompt_len` tokens once rendered (bos, role, end and assistant
    header around them), enough distinct prompts for every step."""
    import torch

    g = torch.Generator().manual_seed(0)
    words = args.prompt_len - 4
    return [" ".join(f"t{i}" for i in torch.randint(N_SPECIAL, args.vocab, (words,), generator=g).tolist())
            for _ in range(args.prompts * args.steps)]


def even_share(text: str) -> float:
    """The reward: the share of the completion's words "tN" whose N is even."""
    words = text.split()
    return sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)


def save_model(args: argparse.Namespace, out: Path) -> None:
    """The speedrun-shaped model with seed-0 weights and the word-level tokenizer, in the transformers
    layout both sides load."""
    import tokenizers

    from athanor.tokenizer import SPECIAL_TOKENS, Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(N_SPECIAL, args.vocab)}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[2]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(SPECIAL_TOKENS)  # split out of text before the words (TRL's rendered template)
    Tokenizer(hf).save(out)
    save_speedrun_model(args, out, args.prompt_len + args.completion_len)


def timed(phases: dict[str, float], name: str, fn: Callable) -> Callable:
    """`fn`, adding the seconds each call takes to phases[name]."""
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    return wrapper


def run_athanor(args: argparse.Namespace, model_dir: Path) -> dict:
    import torch

    from athanor.data.synth import Task
    from athanor.model.hf import load_pretrained
    from athanor.rl.grpo import GRPOLossConfig
    from athanor.rl.rewards import Replies
    from athanor.tokenizer import Tokenizer
    from athanor.train import dist
    from athanor.train.grpo import GRPOConfig, GRPOStage
    from athanor.train.loop import TrainConfig, Trainer

    tok = Tokenizer.load(model_dir)
    tok.stop_ids = []  # replies run to the length limit (see the docstring)
    texts = synthetic_prompts(args)
    tasks = [Task(id=f"p{i}", kind="bench", prompt=t, completion="", key=f"p{i}") for i, t in enumerate(texts)]
    prompt_ids = {t: tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts}
    lengths: list[list[int]] = []

    def reward(r: Replies) -> list[float | None]:
        lengths.append(list(r.lengths))
        return [even_share(t) for t in r.texts]

    model = load_pretrained(model_dir)
    grpo = GRPOConfig(prompts_per_step=args.prompts, num_generations=args.group, num_iterations=1, temperature=1.0,
                      reward_funcs=["even"],
                      loss=GRPOLossConfig(beta=0.0, epsilon=args.epsilon, loss_type="dapo",
                                          max_completion_length=args.completion_len))
    rows = args.prompts * args.group
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.micro_batch, grad_accum=rows // args.micro_batch,
                      lr=args.lr, warmup_steps=0, schedule="constant", weight_decay=0.0, beta2=0.999, grad_clip=1.0,
                      device="cpu", precision="fp32", seed=0)
    stage = GRPOStage(model, None, tok, tasks, [], grpo, cfg, torch.device("cpu"), functions={"even": reward})
    phases: dict[str, float] = {}
    stage.rollout = timed(phases, "rollout", stage.rollout)
    stage.lm.generate = timed(phases, "generation", stage.lm.generate)
    ends, per_step = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, stage, cfg, tmp, dist.setup("cpu"), show_progress=False, name="grpo")
        base = reset_peak()
        ends.append(time.perf_counter())
        for _ in range(args.steps):
            phases.clear()
            trainer.train_step()
            ends.append(time.perf_counter())
            per_step.append(dict(phases))
    return {"ends": ends, "base_mb": base, "phases": per_step, "lengths": lengths, "prompt_ids": prompt_ids,
            "reward": [h["reward"] for h in stage.history]}


def run_trl(args: argparse.Namespace, model_dir: Path) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = synthetic_prompts(args)
    data = [{"prompt": [{"role": "user", "content": t}]} for t in texts]
    lengths: list[list[int]] = []
    rewards: list[float] = []

    def even(completions, completion_ids, **kw) -> list[float]:
        lengths.append([len(c) for c in completion_ids])
        scores = [even_share(c[0]["content"]) for c in completions]
        rewards.append(statistics.mean(scores))
        return scores

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ends: list[float] = []
    base: list[float] = []
    phases: dict[str, float] = {}
    per_step: list[dict[str, float]] = []

    def record_phases() -> None:
        per_step.append(dict(phases))
        phases.clear()

    rows = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trl.GRPOConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=rows // args.micro_batch, num_generations=args.group,
            max_completion_length=args.completion_len, temperature=1.0, top_p=1.0, top_k=0,
            loss_type="dapo", beta=0.0, epsilon=args.epsilon, num_iterations=1, scale_rewards="group",
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, seed=0, use_cpu=True, dataloader_num_workers=0,
            report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False,
            # athanor's settings for this run (TRL's defaults: bf16 autocast, gradient checkpointing).
            bf16=False, gradient_checkpointing=False, use_vllm=False,
            generation_kwargs={"min_new_tokens": args.completion_len})
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[even], args=cfg,
                                  train_dataset=datasets.Dataset.from_list(data), processing_class=tok,
                                  callbacks=[trl_step_clock(ends, base, record_phases)])
        prompt_ids: dict[str, list[int]] = {}
        tokenize = trainer._tokenize_prompts

        def tokenize_and_record(prompts):
            out = tokenize(prompts)
            prompt_ids.update({p[0]["content"]: list(ids) for p, ids in zip(prompts, out[0], strict=True)})
            return out

        trainer._tokenize_prompts = tokenize_and_record
        trainer._generate_and_score_completions = timed(phases, "rollout", trainer._generate_and_score_completions)
        trainer._generate = timed(phases, "generation", trainer._generate)
        trainer.train()
    return {"ends": ends, "base_mb": base[0], "phases": per_step, "lengths": lengths, "prompt_ids": prompt_ids,
            "reward": rewards}


def side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(args, Path(tmp))
        result = (run_athanor if args.side == "athanor" else run_trl)(args, Path(tmp))
    result["step_peak_mb"] = status_mb("VmHWM") - result["base_mb"]
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens of each rendered prompt (chat tokens included)")
    p.add_argument("--completion-len", type=int, default=64, help="tokens of every completion")
    p.add_argument("--micro-batch", type=int, default=32, help="rows per micro-batch (prompts x group is one step)")
    p.add_argument("--steps", type=int, default=4, help="steps per side and round (the first is left out)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epsilon", type=float, default=0.2)
    add_shape_args(p)
    p.add_argument("--raw", help="also write every process's per-step times and phases to this JSON file")
    p.add_argument("--side", choices=["athanor", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        side(args)
        return
    if args.prompt_len < 5 or (args.prompts * args.group) % args.micro_batch:
        sys.exit("--prompt-len must be at least 5, and prompts x group a multiple of --micro-batch")
    rows = args.prompts * args.group
    print(f"GRPO (dapo loss, beta 0, eps {args.epsilon}), {args.prompts} prompts x G={args.group} = {rows} "
          f"completions/step of {args.prompt_len} + {args.completion_len} tokens, micro-batches of {args.micro_batch}, "
          f"fp32, {args.threads} thread(s); median of {args.steps - 1} steps x {args.rounds} rounds")
    # Alternate the sides round by round so machine noise falls on both.
    names = ("athanor", "trl")
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    peak = dict.fromkeys(names, 0.0)
    step_peak = dict.fromkeys(names, 0.0)
    lengths: dict[str, set[int]] = {n: set() for n in names}
    prompts: dict[str, dict[str, list[int]]] = {n: {} for n in names}
    rewards: dict[str, list[float]] = {n: [] for n in names}
    raw: list[dict] = []
    for _ in range(args.rounds):
        for name in names:
            proc = subprocess.run([sys.executable, __file__, "--side", name, *sys.argv[1:]], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} side failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            steps = [b - a for a, b in zip(r["ends"], r["ends"][1:], strict=False)]
            raw.append({"side": name, "steps": steps, "phases": r["phases"]})
            times[name] += steps[1:]
            phases[name] += [dict(ph, step=s) for ph, s in zip(r["phases"][1:], steps[1:], strict=True)]
            peak[name] = max(peak[name], r["peak_mb"])
            step_peak[name] = max(step_peak[name], r["step_peak_mb"])
            if len(r["lengths"]) != args.steps or any(len(b) != rows for b in r["lengths"]):
                sys.exit(f"{name}: expected {args.steps} batches of {rows} completions, got "
                         f"{[len(b) for b in r['lengths']]}")
            lengths[name].update(n for b in r["lengths"] for n in b)
            prompts[name].update(r["prompt_ids"])
            rewards[name] += r["reward"]
    if args.raw:
        Path(args.raw).write_text(json.dumps(raw, indent=1))
    common = prompts["athanor"].keys() & prompts["trl"].keys()
    same = sum(prompts["athanor"][t] == prompts["trl"][t] for t in common)
    plens = {len(ids) for side_ids in prompts.values() for ids in side_ids.values()}
    print(f"prompt ids identical on both sides for {same} of the {len(common)} prompts both sampled; "
          f"prompt lengths {sorted(plens)}")
    for name in names:
        print(f"{name}: completion lengths {sorted(lengths[name])} (every completion of every step); "
              f"mean reward {statistics.mean(rewards[name]):.3f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in names:
        parts = {k: statistics.median(ph.get(k, 0.0) for ph in phases[name]) for k in ("generation", "rollout")}
        update = statistics.median(ph["step"] - ph.get("rollout", 0.0) for ph in phases[name])
        print(f"  {name:8s} {med[name]:6.2f} s/step   peak RSS {peak[name]:6.0f} MB   step peak "
              f"+{step_peak[name]:5.0f} MB   (medians: generation {parts['generation']:.2f} s, scoring "
              f"{parts['rollout'] - parts['generation']:.2f} s, update {update:.2f} s)")
    print(f"  athanor: {med['trl'] / med['athanor']:.2f}x the step rate (TRL/athanor step time), "
          f"{peak['athanor'] / peak['trl']:.2f}x the peak RSS, {step_peak['athanor'] / step_peak['trl']:.2f}x the "
          f"step peak")


if __name__ == "__main__":
    main()
