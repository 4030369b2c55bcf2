"""The `athanor` command: one subcommand per stage. Thin: parse arguments, then call the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from athanor.errors import AthanorError

if TYPE_CHECKING:
    from athanor.train.pretrain import PretrainRecipe

def overrides_help(sections: str, example: str) -> str:
    """The paragraph every recipe-driven command shares, naming that command's own sections."""
    return ("Settings come from the recipe's defaults, then the YAML file given with --recipe, then\n"
            f"--section.key=value overrides, e.g. {example}.\n"
            f"Sections: {sections}. An unknown key is an error.")


OVERRIDES_HELP = overrides_help("tokenizer, data, model, train (recipes/speedrun.yaml lists every key)",
                                "--train.max_steps=200 --model.hidden_size=512 --data.paths=notes/*.md")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", metavar="FILE", help="YAML recipe to start from (see recipes/)")
    p.add_argument("--out", metavar="DIR", help="run directory to write (same as --out_dir=DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_pretrain_recipe(args: argparse.Namespace, overrides: list[str], default_out: str,
                          cls: type[PretrainRecipe] | None = None) -> PretrainRecipe:
    """`cls`: a recipe with more sections than pre-training's (the speedrun's)."""
    from athanor.config import load_recipe
    from athanor.train.pretrain import PretrainRecipe

    recipe = load_recipe(cls or PretrainRecipe, args.recipe, overrides)
    if args.out:
        recipe.out_dir = args.out
    elif recipe.out_dir == PretrainRecipe().out_dir:  # not set by the recipe file or an override
        recipe.out_dir = default_out
    return recipe


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data.corpus import DataConfig, describe, is_held_out, iter_documents
    from athanor.io import refuse_to_overwrite
    from athanor.tokenizer import Tokenizer, TokenizerConfig

    refuse_to_overwrite(args.out, args.force)  # before the work, not after it
    data = load_recipe(DataConfig, None, [f"--paths={','.join(args.data)}"] if args.data else [])
    cfg = TokenizerConfig(vocab_size=args.vocab_size, max_train_chars=args.max_chars)
    docs = (d.text for d in iter_documents(data) if not is_held_out(d.id, data.val_fraction))
    tok = Tokenizer.train(docs, cfg, show_progress=not args.quiet)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token byte-level BPE on {describe(data)} -> {Path(args.out) / 'tokenizer.json'}")


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.pretrain import pretrain

    recipe = _load_pretrain_recipe(args, overrides, "runs/pretrain")
    result = pretrain(recipe, show_progress=not args.quiet)
    print(f"done: held-out loss {result['val_loss']:.4f}, {result['val_bpb']:.3f} bits/byte "
          f"(unigram baseline {result['unigram_bpb']:.3f}) -> {recipe.out_dir}")


def cmd_speedrun(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.speedrun import SpeedrunRecipe, speedrun

    recipe = _load_pretrain_recipe(args, overrides, "runs/speedrun", SpeedrunRecipe)
    report = speedrun(recipe, show_progress=not args.quiet)
    print(f"report: {report}")


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.lm.local import LocalLM
    from athanor.serve.sampling import SamplingParams

    if args.num_samples < 1:
        raise AthanorError(f"--num-samples must be at least 1, got {args.num_samples}")
    lm = LocalLM.load(args.run_dir)
    # One seed per sample, so samples differ from each other and repeat across runs; decoded together.
    params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=None if args.seed is None else args.seed + i)
              for i in range(args.num_samples)]
    for i, c in enumerate(lm.complete([args.prompt] * args.num_samples, params)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + c.text)


SERVE_EXTRA = ("fastapi", "uvicorn", "starlette", "pydantic")  # what `pip install 'athanor[serve]'` brings


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        from athanor.serve.server import serve
    except ModuleNotFoundError as e:
        # The HTTP server is an optional extra; `athanor chat` and `generate` run without it.
        if e.name not in SERVE_EXTRA:
            raise
        raise AthanorError(f"`athanor {args.command}` needs the serve extra ({e.name} is not installed): "
                           "pip install 'athanor[serve]' (in a clone: pip install -e '.[serve]')") from None

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        print(f"athanor: open http://{args.host}:{args.port}/ in a browser (?embed=1 for the compact view)")
    serve(args.run_dir, host=args.host, port=args.port, max_batch=args.max_batch, api_key=args.api_key,
          frame_ancestors=args.frame_ancestors, compile=args.compile)


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.serve.chat import chat

    chat(args.run_dir, system=args.system, temperature=args.temperature, top_p=args.top_p,
         max_tokens=args.max_tokens, seed=args.seed)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together at most (KV cache slots; default 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models "
                        "on a busy machine)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode steps ahead of time (torch.export + AOTInductor), for one "
                        "request and for all active requests at once: ~10-25 s per step kind on its first "
                        "use, then ~1.7x the default's decode rate (see BENCHMARKS.md)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--frame-ancestors", default="*",
                   help="CSP frame-ancestors: who may embed the demo page in an iframe "
                        "(default '*': anyone; \"'self'\" for this origin only)")
    p.set_defaults(func=cmd_serve)

def cmd_quantize(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    action, path = (args.target, args.path) if args.target in ("imatrix", "export", "import") else (None, args.target)
    if action and not path:
        raise AthanorError(f"`athanor quantize {action}` needs a path after it (see --help)")
    if action == "import":
        from athanor.quant.gguf import import_gguf

        out = import_gguf(path, args.out or Path(path).with_suffix(""), force=args.force)
        print(f"imported {path} -> {out}")
        return
    from athanor.quant.imatrix import calibration_tokens, collect_imatrix, load_imatrix, save_imatrix

    if action == "imatrix":
        from athanor.io import refuse_to_overwrite
        from athanor.model.hf import load_pretrained

        out = Path(args.out or Path(path) / "imatrix.safetensors")
        refuse_to_overwrite(out, args.force)  # before the work, not after it
        tokens = calibration_tokens(path, args.tokens, "train", args.text)
        imatrix = collect_imatrix(load_pretrained(path), tokens)
        save_imatrix(imatrix, out)
        print(f"importance matrix of {len(imatrix)} Linear layers from {len(tokens):,} tokens -> {out}")
        return
    imatrix = load_imatrix(args.imatrix) if args.imatrix else None
    if action == "export":
        from athanor.quant.gguf import export_gguf

        out = Path(args.out or Path(path) / f"model-{args.type.upper()}.gguf")
        info = export_gguf(path, out, args.type, imatrix, compile=args.compile, force=args.force)
        print(f"{info['scheme']}: {info['bytes'] / 1e6:.2f} MB -> {out}")
        return
    from athanor.quant.scorecard import ScorecardConfig, run_scorecard

    cfg = ScorecardConfig(types=tuple(t.strip() for t in args.types.split(",") if t.strip()),
                          eval_tokens=args.tokens, imatrix_tokens=0 if (args.no_imatrix or imatrix) else 8192,
                          compile=args.compile)
    out = Path(args.out or Path(path) / "quant")
    run_scorecard(path, out, cfg, text_file=args.text, imatrix=imatrix, force=args.force)
    print((out / "scorecard.md").read_text())
    gguf = f"; GGUF files in {out}" if any(out.glob("model-*.gguf")) else ""
    print(f"scorecard -> {out / 'scorecard.md'} and {out / 'scorecard.png'}{gguf}")

def cmd_data_check(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.data.formats import check_file
    from athanor.tokenizer import Tokenizer

    if args.max_length is not None and not args.tokenizer:
        raise AthanorError("--max-length counts tokens, so it needs --tokenizer")
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    failed = False
    for path in args.files:
        r = check_file(path, tok, max_length=args.max_length)
        print(f"{r['path']}: {r['examples']} {r['kind']} {r['formats']}, {r['errors']} errors")
        for key, stat in r["lengths"].items():
            print(f"  {key:16s} min {stat['min']}  mean {stat['mean']}  max {stat['max']}")
        for err in r["error_list"]:
            print(f"  error: {err}")
        if r["errors"] > len(r["error_list"]):
            print(f"  ... and {r['errors'] - len(r['error_list'])} more errors")
        failed |= r["errors"] > 0
    if failed:
        raise AthanorError("some records are invalid (see above)")


def cmd_synth_tasks(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    import json

    from athanor.data.synth import make_splits, seed_hack, verify_references, write_tasks
    from athanor.io import atomic_write_text, refuse_to_overwrite

    refuse_to_overwrite(args.out, args.force)
    train, heldout, report = make_splits(args.train, args.heldout, args.seed, args.kinds.split(","))
    if args.seed_hack:
        train, report["hacked_train_answers"] = seed_hack(train, args.seed_hack, args.seed)
    if args.verify:
        bad = verify_references(heldout)
        if bad:
            raise AthanorError(f"held-out tasks whose reference fails or whose empty answer passes: {bad[:5]}")
        report["verified_heldout"] = len(heldout)
    out = Path(args.out)
    write_tasks(train, out / "train.jsonl")
    write_tasks(heldout, out / "heldout.jsonl")
    atomic_write_text(out / "overlap.json", json.dumps(report, indent=2) + "\n")
    print(f"{len(train)} train / {len(heldout)} held-out tasks -> {out}; exact overlap {report['exact_overlap']}, "
          f"near-duplicate pairs {report['near_duplicate_pairs']} (3-gram Jaccard >= {report['jaccard_threshold']})"
          + (f"; {report['hacked_train_answers']} train answers replaced by the early-exit hack"
             if args.seed_hack else ""))


def _load_finetune_recipe(cls: type, args: argparse.Namespace, overrides: list[str], *extra: str) -> Any:
    """A fine-tuning recipe (SFT, DPO, RM) from --recipe, the shared flags (--base, --data, --lora, --out)
    and the overrides; `extra` are the command's own flags as overrides."""
    from athanor.config import load_recipe

    flags = [f"--data.paths={','.join(args.data)}"] if args.data else []
    flags += [f"--base={args.base}"] if args.base else []
    flags += ["--lora.enabled=true"] if args.lora else []
    recipe = load_recipe(cls, args.recipe, flags + list(extra) + overrides)
    if args.out:
        recipe.out_dir = args.out
    return recipe


def cmd_sft(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.sft import SFTRecipe, behavior_table, sft

    recipe = _load_finetune_recipe(SFTRecipe, args, overrides)
    result = sft(recipe, show_progress=not args.quiet)
    if "behavior" in result:
        from athanor.report import markdown_table

        b = result["behavior"]
        print(markdown_table(behavior_table(b["base"], b["sft"])))
    loss = f"held-out loss {result['val_loss']:.4f}, " if "val_loss" in result else ""
    print(f"done: {loss}{result['tokens_seen']:,} tokens -> {recipe.out_dir}")


def cmd_dpo(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.dpo import DPORecipe, dpo

    loss = [f"--loss.loss_type={args.loss}"] if args.loss else []
    recipe = _load_finetune_recipe(DPORecipe, args, overrides, *loss)
    result = dpo(recipe, show_progress=not args.quiet)
    held = (f"held-out pairs: loss {result['val_loss']:.4f}, reward accuracy {result['val_rewards/accuracies']:.0%}, "
            f"margin {result['val_rewards/margins']:+.3f}; " if "val_loss" in result else "")
    print(f"done ({result['loss_type']}, {result['train_pairs']} pairs): {held}-> {recipe.out_dir}")


def cmd_rm(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.rm import RMRecipe, rm

    recipe = _load_finetune_recipe(RMRecipe, args, overrides)
    result = rm(recipe, show_progress=not args.quiet)
    held = (f"held-out pairs: loss {result['val_loss']:.4f}, accuracy {result['val_accuracy']:.1%} "
            f"(95% Wilson interval {result['val_accuracy_ci95_low']:.1%}-{result['val_accuracy_ci95_high']:.1%}, "
            f"{result['heldout_pairs']} pairs), margin {result['val_margin']:+.3f}; " if "val_loss" in result else "")
    print(f"done (reward model, {result['train_pairs']} pairs): {held}-> {recipe.out_dir}")


def cmd_grpo(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.grpo import GRPORecipe, grpo

    recipe = _load_finetune_recipe(GRPORecipe, args, overrides)
    result = grpo(recipe, show_progress=not args.quiet)
    first, last = result["first_rollout"] or {}, result["last_rollout"] or {}
    print(f"done ({result['rollouts']} generation batches): reward {first.get('reward', float('nan')):.3f} -> "
          f"{last.get('reward', float('nan')):.3f}")
    for how, h in result.get("heldout", {}).items():
        interval = f" ({h['diff']:+.1%}, 95% interval {h['diff_low']:+.1%} to {h['diff_high']:+.1%})" \
            if "diff" in h else ""
        print(f"held-out {how} pass@1 on {h['tasks']} tasks: {h['before']:.1%} -> {h['after']:.1%}{interval}")
    print(f"-> {recipe.out_dir} (every completion in {recipe.out_dir}/rollouts.jsonl: `athanor audit "
          f"{recipe.out_dir}`)")


def cmd_facts(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.train.facts_stage import FactsRecipe, facts_experiment, reading, table

    recipe = load_recipe(FactsRecipe, args.recipe, ([f"--base={args.base}"] if args.base else []) + overrides)
    if args.out:
        recipe.out_dir = args.out
    result = facts_experiment(recipe, show_progress=not args.quiet)
    print(table(result))
    print()
    print(reading(result))
    print(f"-> {recipe.out_dir} (every answer in {recipe.out_dir}/answers.jsonl)")


def cmd_ppo(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.train.ppo import PPORecipe, ppo

    reward = [f"--reward={args.reward}"] if args.reward else []
    recipe = _load_finetune_recipe(PPORecipe, args, overrides, *reward)
    result = ppo(recipe, show_progress=not args.quiet)

    def line(stats: dict | None) -> str:
        if not stats:
            return "-"
        gold = f", gold {stats['gold']:.0%}" if "gold" in stats else ""
        return f"reward {stats['reward']:+.3f}{gold}, KL {stats['kl']:.2f}"

    held = (f"; held-out greedy: reward {result['val_reward']:+.3f}"
            + (f", gold {result['val_gold']:.0%}" if "val_gold" in result else "")) if "val_reward" in result else ""
    print(f"done ({result['rollouts']} rollouts): first {line(result['first_rollout'])}; last "
          f"{line(result['last_rollout'])}{held} -> {recipe.out_dir}")


def cmd_lora_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.io import refuse_to_overwrite
    from athanor.model.hf import load_pretrained, save_pretrained
    from athanor.model.lora import load_adapter, merge_lora
    from athanor.tokenizer import Tokenizer

    refuse_to_overwrite(args.out, args.force)
    model = load_pretrained(args.base)
    info = load_adapter(model, args.adapter)
    save_pretrained(merge_lora(model), args.out)
    if (Path(args.base) / "tokenizer.json").is_file():
        Tokenizer.load(args.base).save(args.out, model_max_length=model.config.max_position_embeddings)
    print(f"merged {len(info.targets)} adapters (r={info.config.r}) into {args.base} -> {args.out}")


def cmd_synth_distill(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data.distill import DistillConfig, distill, make_teacher, seed_instructions

    cfg = load_recipe(DistillConfig, None, [f"--n={args.n}", f"--seed={args.seed}", *overrides])
    teacher = make_teacher(args.teacher, args.model, args.api_key_env)
    result = distill(teacher, args.out, seed_instructions(args.seeds, cfg.seed), cfg,
                     progress=None if args.quiet else lambda k, n: print(f"\raccepted {k}/{n}", end="", flush=True))
    print(f"\n{result['accepted']} accepted, {result['rejected']} rejected {result['rejected_by_reason']} "
          f"-> {result['output']}")


def _report_line(report: dict, keys: tuple[str, ...]) -> str:
    shown = {k: f"{v:.0%}" if isinstance(v, float) else v for k, v in report.items() if k in keys and v is not None}
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items())


def _synth_heldout() -> int:
    """The held-out split `athanor sft` makes by default: tasks made from a count keep clear of it."""
    from athanor.train.sft import SFTDataConfig

    return SFTDataConfig().synth_heldout


def cmd_pairs_verifier(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data import verifier_pairs as vp
    from athanor.io import refuse_to_overwrite
    from athanor.lm import open_lm

    for path in (args.out, vp.report_path(args.out)):
        refuse_to_overwrite(path, args.force)
    cfg = load_recipe(vp.VerifierConfig, None, [f"--k={args.k}", f"--seed={args.seed}", *overrides])
    tasks = vp.tasks_from_spec(args.tasks, cfg.seed, _synth_heldout())
    lm = open_lm(args.model, args.model_name, args.api_key_env)
    records, report = vp.make_verifier_pairs(lm, tasks, cfg, show_progress=not args.quiet)
    vp.write_pairs(args.out, records, report)
    print(_report_line(report, ("tasks", "answers", "pass_rate", "pairs", "tasks_all_passed", "tasks_all_failed"))
          + f" -> {args.out} (report: {vp.report_path(args.out)})")


def cmd_pairs_judge(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data.preferences import load_pairs
    from athanor.data.verifier_pairs import report_path, tasks_from_spec, write_pairs
    from athanor.io import refuse_to_overwrite
    from athanor.lm import open_lm
    from athanor.rl.judge import JudgeConfig, judge_pairs, verifier_labels

    for path in (args.out, report_path(args.out)):
        refuse_to_overwrite(path, args.force)
    cfg = load_recipe(JudgeConfig, None, [f"--seed={args.seed}", *overrides])
    if args.rubric:
        cfg.rubric = args.rubric
    pairs = load_pairs(args.pairs)
    labels = verifier_labels(pairs, tasks_from_spec(args.tasks, args.seed, _synth_heldout())) if args.tasks else None
    judge = open_lm(args.judge, args.model_name, args.api_key_env)
    records, report = judge_pairs(judge, pairs, cfg, labels, show_progress=not args.quiet)
    print(_report_line(report, ("comparisons", "position_consistency", "unparsed_verdicts", "first_position_rate",
                                "verifier_known_consistent", "verifier_agreement", "pairs")))
    write_pairs(args.out, records, report)
    print(f"-> {args.out} (report: {report_path(args.out)})")


def cmd_overopt(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data.verifier_pairs import tasks_from_spec
    from athanor.io import refuse_to_overwrite
    from athanor.lm import open_lm
    from athanor.rl.overoptimization import OveroptConfig, measure

    refuse_to_overwrite(args.out, args.force)  # before the work, not after it
    cfg = load_recipe(OveroptConfig, None, [f"--sampling.k={args.n}", f"--sampling.seed={args.seed}", *overrides])
    tasks = tasks_from_spec(args.tasks, args.seed, _synth_heldout(), split="heldout")
    policy = open_lm(args.policy, args.model_name, args.api_key_env)
    result = measure(policy, args.rm, tasks, cfg, args.out, show_progress=not args.quiet)
    first, last, peak = result["rows"][0], result["rows"][-1], result["peak"]
    print(f"gold pass rate {first['gold']:.1%} at n=1, {peak['gold']:.1%} at its peak n={peak['n']}, "
          f"{last['gold']:.1%} at n={last['n']} (KL {last['kl']:.2f} nats); proxy {first['proxy']:.3f} -> "
          f"{last['proxy']:.3f} -> {Path(args.out) / 'overopt.md'}")


def cmd_audit(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    import json

    from athanor.io import atomic_write_text, refuse_to_overwrite
    from athanor.rl.audit import REPORT_NAME, audit_log, resolve_log, summary

    out = resolve_log(args.log).with_name(REPORT_NAME)
    refuse_to_overwrite(out, args.force)
    report = audit_log(args.log)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"-> {out}")


def _need_mcp() -> None:
    """MCP is an optional extra: say how to get it rather than fail on an import."""
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        raise AthanorError("MCP needs the agent extra (the `mcp` package is not installed): "
                           "pip install 'athanor[agent]' (in a clone: pip install -e '.[agent]')")


def cmd_agent(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from contextlib import ExitStack

    from athanor.agent.loop import Agent, AgentLimits
    from athanor.agent.tools import Workspace, rag_tool
    from athanor.lm.endpoint import EndpointLM
    from athanor.rl.sandbox import Limits

    task = Path(args.task[1:]).read_text() if args.task.startswith("@") else args.task
    workspace = Workspace(args.workdir, Limits(wall_s=args.tool_seconds, cpu_s=max(1, int(args.tool_seconds))))
    servers = {}
    if args.mcp_config or args.mcp:
        from athanor.agent.mcp_client import load_config, parse_cli_spec

        servers = load_config(args.mcp_config) if args.mcp_config else {}  # a bad config is told first
        servers.update(parse_cli_spec(spec, i) for i, spec in enumerate(args.mcp or [], 1))
        _need_mcp()
    limits = AgentLimits(max_steps=args.max_steps, max_seconds=args.max_seconds, max_tokens=args.max_tokens,
                         context=args.context, reply_tokens=args.reply_tokens)
    lm = EndpointLM(args.model, args.model_name, retries=args.retries)
    with ExitStack() as stack:
        tools = workspace.tools() + ([rag_tool(args.rag)] if args.rag else [])
        if servers:
            from athanor.agent.mcp_client import MCPTools

            tools += stack.enter_context(MCPTools(servers)).tools
        agent = Agent(lm, tools, args.trajectory, limits, tool_format=args.tool_format,
                      temperature=args.temperature, log=lambda line: print(line, file=sys.stderr))
        result = agent.run(task)
    print(result.answer)
    print(f"[{result.reason}: {result.steps} steps, {result.tokens} tokens, {result.seconds:.0f} s; "
          f"trajectory: {args.trajectory}]", file=sys.stderr)


def cmd_mcp_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    _need_mcp()
    from athanor.agent.mcp_server import serve

    serve(args.http, args.host, args.model, args.rag)


def cmd_rag_index(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    import time

    from athanor.rag.index import open_index

    for path in args.paths:  # before seconds of loading the embedding model
        if not Path(path).exists():
            raise AthanorError("no such file or directory", path=path)
    t0 = time.perf_counter()
    index = open_index(args.index, dense=not args.no_dense, max_tokens=args.chunk_tokens, overlap=args.overlap)
    report = index.update_paths(args.paths, show_progress=not args.quiet)
    index.save(args.index)
    for name in report.skipped or []:
        print(f"skipped (not UTF-8 text): {name}", file=sys.stderr)
    print(f"{args.index}: {report.chunks} passages from {len(index.files)} files; this update: "
          f"{report.added} added, {report.changed} changed, {report.removed} removed, {report.unchanged} "
          f"unchanged files, {report.embedded} passages embedded ({time.perf_counter() - t0:.1f} s)")


def _rag_lm(args: argparse.Namespace) -> Any:
    from athanor.lm import open_lm

    return open_lm(args.model, args.model_name)


def cmd_rag_ask(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.rag.answer import answer_questions, format_hits
    from athanor.rag.index import RagIndex

    index = RagIndex.load(args.index)
    hits = index.search(args.question, args.k, args.mode or ("hybrid" if index.embedder else "bm25"))
    if args.model:
        (answer,) = answer_questions(_rag_lm(args), [args.question], [hits], args.max_tokens)
        print(answer.text)
        print("\ncited: " + (", ".join(f"[{n}] {hits[n - 1].chunk.id}" for n in answer.cited) or "none"))
        return
    print(format_hits(hits))


def cmd_rag_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.rag.evaluate import (
        SHIPPED_QUESTIONS,
        answer_rows,
        reachable,
        read_questions,
        retrieval_rows,
        shipped_sources,
    )
    from athanor.rag.index import open_index
    from athanor.report import markdown_table

    questions = read_questions(args.questions or SHIPPED_QUESTIONS)[: args.limit]
    index = open_index(args.index, dense=not args.no_dense)
    if not index.chunks or args.paths:
        paths = args.paths or shipped_sources(questions)
        index.update_paths(paths, show_progress=not args.quiet)
        index.save(args.index)
    modes = ["bm25"] if index.embedder is None else ["bm25", "dense", "hybrid"]
    print(f"{len(questions)} questions, {len(index.chunks)} passages from {len(index.files)} files; "
          f"{reachable(index, questions)} questions have a gold passage in the index\n")
    print(markdown_table(retrieval_rows(index, questions, modes)))
    if args.model:
        print()
        print(markdown_table(answer_rows(_rag_lm(args), index, questions, args.k, modes[-1], args.max_tokens)))


def _add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace what is already in --out; without it a non-empty --out is refused, so "
                        "nothing you made is overwritten by accident")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="athanor",
        description="The whole life of a language model: tokenizer, pre-training, generation, fine-tuning "
                    "(SFT, LoRA), serving and quantization. Start with `athanor speedrun`: it runs every stage on "
                    "the embedded default corpus (the Python standard library) and writes a report.",
        epilog="`athanor COMMAND --help` explains each command and its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("speedrun", help="run every stage end to end on the embedded default and write report.md",
                       description="Train a tokenizer and a small Llama-style model on the Python standard "
                                   "library, evaluate it on held-out files against a unigram baseline, sample "
                                   "from it, fine-tune it on synthetic tasks (SFT), measure serving (TTFT, decode, "
                                   "speculative decoding) and quantization damage, and write "
                                   "runs/speedrun/report.md. About 7 minutes on 2 CPU cores. "
                                   "A run directory that already holds checkpoints is resumed. Each later stage has "
                                   "its size knobs in sections samples, sft, draft, serving and quant "
                                   "(--draft.steps=100).\n\n" + OVERRIDES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.set_defaults(func=cmd_speedrun)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                         description="Tokenizer commands. A tokenizer turns text into the integer ids a model "
                                     "reads; `athanor tokenizer train` learns one from your text (or the default "
                                     "corpus).")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer and save tokenizer.json",
                           description="Train a GPT-2 style byte-level BPE on text (the Python stdlib by "
                                       "default) and save tokenizer.json + tokenizer_config.json (with the chat "
                                       "template) into --out, loadable by transformers' AutoTokenizer.")
    p.add_argument("--data", nargs="*", metavar="PATH",
                   help="text files, directories, globs, .jsonl or .parquet (default: the Python standard library)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary (default 4096)")
    p.add_argument("--max-chars", type=int, default=6_000_000,
                   help="characters of text to learn merges from (default 6,000,000)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer into")
    _add_force_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="pre-train a model on next-token prediction",
                       description="Pre-train a Llama-style model: tokenizer (trained unless "
                                   "tokenizer_path is set), token shards, the training loop with checkpoints, "
                                   "then held-out loss and bits per byte. Re-running on the same --out resumes "
                                   "from the newest checkpoint. Under `torchrun --nproc_per_node=N` it trains "
                                   "data-parallel (--train.parallel=fsdp to shard).\n\n" + OVERRIDES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="sample text from a trained run directory",
                       description="Continue a prompt with a model from a run directory (or a Llama/Qwen2 "
                                   "checkpoint in the Hugging Face layout whose tokenizer.json has athanor's "
                                   "special tokens; other tokenizers are not supported yet). The prompt must "
                                   "leave room in the model's context to generate into; the settings follow the "
                                   "same rules as `athanor serve` (an out-of-range value is refused, not "
                                   "adjusted).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    p.add_argument("--max-new-tokens", "--max-tokens", type=int, default=128,
                   help="tokens to generate at most (default 128); generation also stops where the model's "
                        "context is full, as on the server, so a larger number just means 'to the end'")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="in [0, 2]: 0 = greedy; higher = more random (default 0.8)")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample only from the k likeliest tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]; 1 = off (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print (default 1)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and the demo page)",
                       description="Start an HTTP server for a run directory: /v1/completions, "
                                   "/v1/chat/completions (streaming, logprobs, n, stop, seed), /v1/models, "
                                   "/health, /metrics (Prometheus) and the next-token demo page at /. Requests "
                                   "are batched continuously; shared prompt prefixes reuse their KV cache. Needs "
                                   "the serve extra: pip install 'athanor[serve]'.")
    _add_serve_args(p)
    p = sub.add_parser("demo", help="the next-token demo page: watch the distribution as you type",
                       description="Serve the interactive next-token page (and the API) for a run directory; "
                                   "open the printed address in a browser. Add ?embed=1 for a compact view "
                                   "to put in an iframe. Needs the serve extra: pip install 'athanor[serve]'.")
    _add_serve_args(p)

    p = sub.add_parser("chat", help="chat with a model in the terminal, answers streamed as they are generated",
                       description="A terminal chat with a run directory's model, using its chat template. "
                                   "/reset forgets the conversation, /quit or Ctrl-D leaves. When the conversation "
                                   "outgrows the model's context, the oldest exchanges are forgotten. Needs no "
                                   "HTTP server (and not the serve extra).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="in [0, 2]: 0 = greedy; higher = more random (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling threshold in (0, 1]; 1 = off (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="longest answer in tokens (default 256); an answer also ends where the context is full")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable answers")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("quantize", help="quantize a model: damage scorecard, GGUF export/import, importance matrix",
                       description="athanor quantize RUN_DIR [--types ...]: quantize the model to each type, write "
                                   "its GGUF file, and score the damage against full precision on held-out text "
                                   "(perplexity, KL divergence, top-1 agreement, answer similarity, decode speed) "
                                   "into RUN_DIR/quant/scorecard.md and .png.\n"
                                   "athanor quantize export RUN_DIR --type Q4_K_M --out m.gguf: one GGUF file for "
                                   "llama.cpp.\n"
                                   "athanor quantize import FILE.gguf --out DIR: a GGUF (llama architecture) back "
                                   "into a run directory.\n"
                                   "athanor quantize imatrix RUN_DIR --out FILE: the importance matrix (mean squared "
                                   "activation per input column of every Linear) from calibration text; pass it "
                                   "with --imatrix to weight the K-quant search.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="RUN_DIR|ACTION", help="a run directory, or one of: imatrix, export, import")
    p.add_argument("path", nargs="?", metavar="PATH", help="for an ACTION: the run directory (or .gguf to import)")
    p.add_argument("--types", default="F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K,Q2_K",
                   help="comma-separated types to score (pure: F32 F16 Q8_0 Q6_K Q5_K Q5_1 Q5_0 Q4_K Q4_1 Q4_0 "
                        "Q3_K Q2_K TQ2_0 (ternary); mixes: Q5_K_M Q4_K_M Q3_K_M)")
    p.add_argument("--type", default="Q4_K_M", help="export: the type of the GGUF file (default Q4_K_M)")
    p.add_argument("--out", metavar="PATH", help="output file or directory (defaults inside the run directory)")
    p.add_argument("--force", action="store_true",
                   help="replace what is already at the output (a scorecard directory, GGUF or importance-matrix "
                        "file, a non-empty run directory to import into); without it the command refuses")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix from `athanor quantize imatrix`")
    p.add_argument("--no-imatrix", action="store_true", help="scorecard: do not collect an importance matrix")
    p.add_argument("--text", metavar="FILE", help="text to evaluate (scorecard) or calibrate (imatrix) on, instead "
                                                  "of the run's own held-out / training token shards")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of that text to use (default 8192)")
    p.add_argument("--compile", action="store_true",
                   help="scorecard/export: quantize Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 with torch.compile'd kernels: the "
                        "same bytes, ~2x faster on big models, but each type first compiles (seconds; ~20 s on "
                        "a fresh machine; needs a C++ compiler)")
    p.set_defaults(func=cmd_quantize)
    data = sub.add_parser("data", help="inspect instruction and preference data files",
                          description="Data commands: `athanor data check FILE` validates a file of chat examples "
                                      "or preference pairs before you train on it.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("check", help="validate instruction or preference data; report counts, lengths, errors",
                            description="Read instruction data (Alpaca instruction/input/output, chat `messages`, "
                                        "ShareGPT `conversations`, or prompt/completion) or preference pairs (TRL's "
                                        "prompt/chosen/rejected as text or messages, or chosen/rejected with an "
                                        "implicit prompt; optional margin or score_chosen/score_rejected) from "
                                        "JSONL, a JSON array or parquet; the first record tells which. Report how "
                                        "many records there are of each format, their lengths and every error with "
                                        "file, line and field. Trains nothing. Exits with status 2 if any record "
                                        "is invalid.")
    p.add_argument("files", nargs="+", metavar="FILE", help="data files (.jsonl, .json or .parquet)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer (or run dir) to count tokens with")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="context length in tokens: a preference pair whose prompt + answer is longer is an error "
                        "(instruction examples are not checked: SFT cuts them to its context); needs --tokenizer")
    p.set_defaults(func=cmd_data_check)

    synth = sub.add_parser("synth", help="make instruction data: verifiable tasks, or a teacher's answers",
                           description="Synthetic instruction data: `athanor synth tasks` makes tasks whose answers "
                                       "a program can check (for SFT and RL on verifiable rewards); `athanor synth "
                                       "distill` has a stronger teacher model write answers (self-instruct).")
    synth_sub = synth.add_subparsers(dest="synth_command", required=True, metavar="ACTION")
    p = synth_sub.add_parser("tasks", help="generate verifiable tasks with train and held-out splits",
                             description="Generate arithmetic, string, list and small-Python-function tasks, each "
                                         "with a reference answer (and unit tests for functions). Writes "
                                         "train.jsonl and heldout.jsonl (prompt/completion records, usable by "
                                         "`athanor sft`) and overlap.json, the proof that the splits share no "
                                         "exact or near-duplicate item (word 3-gram Jaccard).")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the splits into")
    _add_force_arg(p)
    p.add_argument("--train", type=int, default=3000, help="training tasks (default 3000)")
    p.add_argument("--heldout", type=int, default=200, help="held-out tasks (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same tasks)")
    p.add_argument("--kinds", default="arithmetic,string,list,python",
                   help="comma-separated task kinds (default: all of arithmetic,string,list,python)")
    p.add_argument("--verify", action="store_true",
                   help="check in the sandbox that every held-out reference passes and an empty answer fails")
    p.add_argument("--seed-hack", type=float, default=0.0, metavar="FRACTION",
                   help="for the reward-hacking experiment: replace this fraction of the Python train answers by "
                        "an early-exit hack (a wrong function, then sys.exit(0) before the tests run); held-out "
                        "tasks are never touched (default 0)")
    p.set_defaults(func=cmd_synth_tasks)
    p = synth_sub.add_parser("distill", help="let a teacher model write instruction data (self-instruct)",
                             description="The teacher trick: a stronger model (any OpenAI-compatible endpoint, or "
                                         "a local athanor run dir) expands seed instructions into new ones and "
                                         "answers them; candidates are filtered for length, duplicates and, where "
                                         "the answer has code, by running it in the sandbox. Output is Alpaca JSONL, "
                                         "appended record by record: if the teacher fails, everything accepted so "
                                         "far is kept, and the same command resumes. Filter settings: --n, "
                                         "--near_dup_jaccard=0.7, --max_output_chars=2000, --temperature=0.8, ...")
    p.add_argument("--teacher", required=True, metavar="URL|DIR",
                   help="base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1) or a run directory")
    p.add_argument("--model", default="", help="model name to request from the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key sent)")
    p.add_argument("--seeds", metavar="FILE", help="seed instructions (any instruction format; default: synthetic "
                                                   "tasks)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL (appended to; resumable)")
    p.add_argument("-n", "--n", type=int, default=100, help="accepted examples wanted (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_synth_distill)

    pairs = sub.add_parser("pairs", help="make preference pairs: graded by a verifier, or judged by a model (RLAIF)",
                           description="Make preference pairs (TRL's prompt/chosen/rejected messages, JSONL) for "
                                       "`athanor dpo`: `athanor pairs verifier` samples answers to verifiable tasks "
                                       "and pairs a right one with a wrong one; `athanor pairs judge` lets a model "
                                       "decide which of two answers is better (RLAIF). Each writes FILE and a "
                                       "FILE-stem.report.json with its numbers.")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True, metavar="ACTION")
    lm_help = ("a run directory (or Hugging Face checkpoint) to run here on the engine, or the base URL of an "
               "OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1)")
    tasks_help = ("synthetic tasks: a count N (the train split of `athanor synth tasks --seed SEED`, never a "
                  "held-out task) or a task file (train.jsonl from `athanor synth tasks`, or an SFT run's "
                  "data/train.jsonl)")

    def add_lm_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model-name", default="", metavar="NAME", help="model name to request from an endpoint")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the endpoint's API key (default OPENAI_API_KEY; unset: "
                            "no key sent)")
        p.add_argument("--out", required=True, metavar="FILE", help="pairs to write (JSONL); the report goes to "
                                                                    "FILE with the suffix .report.json")
        _add_force_arg(p)
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same pairs; default 0)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = pairs_sub.add_parser("verifier", help="sample k answers per task, pair a passing with a failing one",
                             description="For each synthetic task, sample --k answers from --model (seeded, at "
                                         "temperature 1 by default), grade each as `athanor sft` grades its held-out "
                                         "tasks (exact answer, or the task's unit tests run in the sandbox), and "
                                         "pair a passing answer (chosen) with a failing one (rejected) of the same "
                                         "prompt. A task whose answers all pass or all fail gives no pair; the "
                                         "report counts those, the pass rate and the pairs. Settings: "
                                         "--temperature=1.0 --top_p=1.0 --max_tokens=64 --batch_tasks=16.")
    p.add_argument("--model", required=True, metavar="DIR|URL", help="the model that answers: " + lm_help)
    p.add_argument("--tasks", default="200", metavar="N|FILE", help=tasks_help + " (default 200)")
    p.add_argument("--k", type=int, default=4, help="answers sampled per task (default 4)")
    add_lm_args(p)
    p.set_defaults(func=cmd_pairs_verifier)

    p = pairs_sub.add_parser("judge", help="let a judge model pick the better answer of each pair (RLAIF)",
                             description="Show a judge model each pair's prompt and two answers with a stated "
                                         "rubric, and ask for the better one, in both orders (answers swapped) to "
                                         "cancel position bias. The verdict must be exactly A or B ([A] and A. are "
                                         "accepted; anything else is no verdict); a pair whose two verdicts "
                                         "disagree, or do not parse, is a tie and is dropped. Writes the pairs the "
                                         "judge decided, chosen = its pick, and reports its position consistency "
                                         "(share of pairs whose two orders agree: a judge that always answers A "
                                         "scores 0%) and, with --tasks, its agreement with the verifier where one "
                                         "answer passes and the other fails. Settings: --max_tokens=8 "
                                         "--temperature=0.0 --batch_pairs=16.")
    p.add_argument("--judge", required=True, metavar="DIR|URL", help="the judge: " + lm_help)
    p.add_argument("--pairs", required=True, metavar="FILE",
                   help="the pairs to judge (any preference file `athanor data check` accepts, e.g. from "
                        "`athanor pairs verifier`); which answer the file calls chosen is not shown to the judge")
    p.add_argument("--tasks", metavar="N|FILE", help=tasks_help + "; the pairs' prompts found among them are "
                                                                  "graded to measure the judge's agreement")
    p.add_argument("--rubric", metavar="TEXT", help="what makes an answer better (default: correctness, then "
                                                    "directness)")
    add_lm_args(p)
    p.set_defaults(func=cmd_pairs_judge)

    p = sub.add_parser("sft", help="supervised fine-tuning: turn a base model into a chat model",
                       description="Fine-tune a base model (--base RUN_DIR) on instruction data (--data FILE ...; "
                                   "Alpaca, messages, ShareGPT or prompt/completion; default: synthetic "
                                   "verifiable tasks) with the loss on assistant tokens only and packed "
                                   "conversations that cannot see each other. Before and after training it "
                                   "measures on held-out tasks how often the model answers (closes its turn) "
                                   "and how often the answer is right. Writes a run directory (the model in "
                                   "the HF layout, eval.json; with --lora also adapter/ in the PEFT layout). "
                                   "Re-running on the same --out resumes from the newest checkpoint.\n\n"
                                   + overrides_help("data, lora, train (defaults in athanor/train/sft.py)",
                                                    "--train.max_steps=300 --lora.r=16"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the model to fine-tune (athanor run dir or HF checkpoint)")
    p.add_argument("--data", nargs="*", metavar="FILE", help="instruction data files (default: synthetic tasks)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("dpo", help="preference tuning: DPO, IPO, hinge, robust DPO or SimPO on chosen/rejected pairs",
                       description="Tune a model (--base RUN_DIR, usually an SFT model) on preference pairs (--data "
                                   "FILE ...: TRL's prompt/chosen/rejected, as text or messages, or chosen/rejected "
                                   "conversations with an implicit prompt; JSONL, JSON or parquet) so that it prefers "
                                   "the chosen answers. --loss picks the objective: sigmoid (DPO), ipo, hinge (SLiC), "
                                   "robust (robust DPO, with --loss.label_smoothing), simpo (no reference model); "
                                   "--loss.rpo_alpha=1 adds the chosen answers' NLL (RPO), so DPO keeps them likely. "
                                   "The reference is the starting model's log-probs of every pair, computed once. "
                                   "A held-out share of the pairs gives the loss and TRL's reward metrics; writes "
                                   "a run directory like `athanor sft`. Re-running on the same --out resumes.\n\n"
                                   + overrides_help("data, loss, lora, train (defaults in athanor/train/dpo.py)",
                                                    "--loss.beta=0.1 --train.max_steps=200"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the model to tune (athanor run dir or HF checkpoint)")
    p.add_argument("--data", nargs="*", metavar="FILE", help="preference pair files")
    p.add_argument("--loss", metavar="TYPE", help="the preference objective (default sigmoid: DPO; see above)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("rm", help="reward model: a scalar score head trained on chosen/rejected pairs",
                       description="Train a reward model from a model (--base RUN_DIR, usually an SFT model) on "
                                   "preference pairs (--data FILE ...: the formats `athanor dpo` reads). The LM head "
                                   "is replaced by a score head read at each sequence's last non-pad token, trained "
                                   "with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) (the "
                                   "margin from the data when it gives one), optionally centered "
                                   "(--loss.center_rewards_coefficient=0.01). A held-out share of the pairs gives "
                                   "the loss, TRL's metrics and the pair accuracy with its 95% Wilson interval "
                                   "(eval.json). The run directory loads in transformers as "
                                   "AutoModelForSequenceClassification (num_labels=1); with --lora also adapter/ "
                                   "(the score head saved whole). Re-running on the same --out resumes.\n\n"
                                   + overrides_help("data, loss, lora, train (defaults in athanor/train/rm.py)",
                                                    "--loss.center_rewards_coefficient=0.01 --train.max_steps=200"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the model to start from (athanor run dir or HF checkpoint)")
    p.add_argument("--data", nargs="*", metavar="FILE", help="preference pair files")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (and the score head) instead of "
                                                       "every weight")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ppo", help="RLHF: PPO against a reward model (or the tasks' verifier)",
                       description="Tune a model (--base RUN_DIR, usually an SFT model) with PPO, as InstructGPT: "
                                   "it answers task prompts (synthetic verifiable tasks, or --data TASK_FILE ... "
                                   "from `athanor synth tasks`), a reward scores each answer (--reward RM_DIR: a "
                                   "reward model from `athanor rm`; or --reward verifier: 1 if the answer is right), "
                                   "and the model moves toward better-scored answers while a per-token KL penalty "
                                   "keeps it near where it started. A value head on the model estimates returns "
                                   "(GAE); the policy and value losses are clipped. Every rollout logs to "
                                   "metrics.jsonl: reward, gold (the verifier's pass rate, beside a reward model's "
                                   "score), kl, kl_coef, entropy, clip_fraction, value_loss, explained_variance, "
                                   "response_length. Writes a run directory like `athanor sft` (the value head is "
                                   "not saved). Re-running on the same --out resumes. The formulas: "
                                   "athanor/rl/ppo.py.\n\n"
                                   + overrides_help("data, ppo, lora, train (defaults in athanor/train/ppo.py)",
                                                    "--ppo.kl_coef=0.1 --ppo.adaptive_kl=true --train.max_steps=128"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the model to tune (athanor run dir or HF checkpoint)")
    p.add_argument("--reward", metavar="RM_DIR|verifier", help="a reward model's run directory (`athanor rm`), or "
                                                                "'verifier' to reward correct answers (default "
                                                                "runs/rm)")
    p.add_argument("--data", nargs="*", metavar="FILE", help="task files to prompt with (default: synthetic tasks)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight (the reference "
                                                       "is then the base with the adapters off: no second copy)")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("grpo", help="RLVR: GRPO (and Dr. GRPO, RLOO, DAPO) on verifiable rewards",
                       description="Tune a model (--base RUN_DIR, usually an SFT model) with GRPO on tasks whose "
                                   "answers can be checked: synthetic tasks, or --data TASK_FILE ... from `athanor "
                                   "synth tasks`. Each step the model answers a batch of prompts G times "
                                   "(--grpo.num_generations); reward functions score every answer "
                                   "(--grpo.reward_funcs: verifier = exact answer or unit tests run in the sandbox, "
                                   "format, overlong; weights in --grpo.reward_weights, 0 logs without rewarding); "
                                   "each answer's advantage is its reward against its group's (grpo, dr_grpo or rloo);"
                                   " the loss is PPO's clipped ratio per token, aggregated as grpo, bnpo, dr_grpo or "
                                   "dapo (--grpo.loss.loss_type), with an optional KL to the start (--grpo.loss.beta)."
                                   " No value model. Multi-turn with a tool: --grpo.environment=python_tool lets a "
                                   "reply run code (a ```run block) in the sandbox and read its output in the next "
                                   "turn, up to --grpo.max_turns replies; the final reply is scored, and the tool's "
                                   "output is masked from the loss (default single: one reply)."
                                   " metrics.jsonl logs reward per function, frac_reward_zero_std, kl,"
                                   " clip ratios, entropy and lengths; held-out pass@1 is measured before and after "
                                   "(and every --train.eval_every steps). Every answer lands in rollouts.jsonl for "
                                   "`athanor audit`. Re-running on the same --out resumes. The formulas: "
                                   "athanor/rl/grpo.py.\n\n"
                                   + overrides_help("data, grpo, lora, train (defaults in athanor/train/grpo.py)",
                                                    "--grpo.num_generations=16 --grpo.loss.beta=0.04 "
                                                    "--train.max_steps=128"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the model to tune (athanor run dir or HF checkpoint)")
    p.add_argument("--data", nargs="*", metavar="FILE", help="task files to prompt with (default: synthetic tasks)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight (a KL's "
                                                       "reference is then the base with the adapters off)")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("facts", help="facts the model never saw: retrieval vs fine-tuning vs both, on paraphrases",
                       description="Generate facts about made-up packages (port, author, release year, timeout), "
                                   "each with its question in one phrasing and two held-out paraphrases; then, from "
                                   "--base (a chat model, e.g. runs/speedrun/sft): (a) fine-tune on the facts, (b) "
                                   "teach the read-from-passages format on other packages' facts and answer with "
                                   "retrieved passages (RAG), (c) both. Prints accuracy on the paraphrases and on "
                                   "the original phrasing with counts and 95% intervals, and what the paired "
                                   "differences show. The design: athanor/train/facts_stage.py.\n\n"
                                   + overrides_help("the top-level keys, lora (defaults in athanor/train/"
                                                    "facts_stage.py)", "--entities=120 --fact_repeats=40"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.add_argument("--base", metavar="DIR", help="the chat model every arm starts from (default runs/speedrun/sft)")
    p.set_defaults(func=cmd_facts)

    p = sub.add_parser("overopt", help="reward-model over-optimization: best-of-n by a reward model, graded by "
                                       "the verifier",
                       description="Does optimizing against a learned reward model help, and when does it start to "
                                   "hurt? (Gao et al. 2022, \"Scaling Laws for Reward Model Overoptimization\".) "
                                   "The policy answers each synthetic task --n times; the reward model scores every "
                                   "answer (the proxy reward) and the tasks' verifier grades it (the gold reward: "
                                   "exact match, or unit tests in the sandbox). For n = 1, 2, 4, ..., --n it "
                                   "estimates, from those same samples and without bias, the expected proxy and gold "
                                   "reward of best-of-n (keep the answer the reward model likes best of n), against "
                                   "KL(best-of-n || policy) = log n - (n-1)/n nats. Over-optimization shows as gold "
                                   "peaking and then falling while the proxy keeps rising. Writes to --out: "
                                   "overopt.md (what the run shows, a table with 95% bootstrap intervals over "
                                   "tasks), overopt.png (both rewards against sqrt KL), overopt.json and "
                                   "samples.jsonl (every answer with its scores). Settings: --sampling.temperature=1.0 "
                                   "--sampling.top_p=1.0 --sampling.max_tokens=64 --sampling.batch_tasks=4 "
                                   "--score_batch=64 --resamples=2000. Cost grows with tasks x n: 120 tasks x 64 "
                                   "answers take a few minutes on 2 CPU cores.")
    p.add_argument("--policy", required=True, metavar="DIR|URL",
                   help="the model that answers (usually the SFT model the reward model was trained from): " + lm_help)
    p.add_argument("--rm", required=True, metavar="DIR", help="the reward model: a run directory of `athanor rm`")
    p.add_argument("--tasks", default="120", metavar="N|FILE",
                   help="synthetic tasks: a count N = the held-out split of `athanor synth tasks --seed SEED "
                        "--heldout N` (the held-out tasks of an SFT run of that seed, which `athanor pairs verifier "
                        "--tasks COUNT` never uses), or a task file such as an SFT run's data/heldout.jsonl "
                        "(default 120)")
    p.add_argument("--n", type=int, default=64,
                   help="answers sampled per task: the largest n of best-of-n (default 64)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the results into")
    p.add_argument("--model-name", default="", metavar="NAME", help="model name to request from an endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks and of the sampling (default 0)")
    _add_force_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_overopt)

    p = sub.add_parser("audit", help="look for reward hacking in an RL run's completions",
                       description="Reward-hacking audit of an RL run. Reads every completion of the rollout log "
                                   "(RUN/rollouts.jsonl, or a JSONL file: one record per completion with task_id, "
                                   "prompt, completion and, if any, visible_tests, canary, visible_passed, "
                                   "hidden_passed) and flags, without running anything, the known ways to pass "
                                   "tests without solving the task: early_exit (sys.exit, os._exit, raise "
                                   "SystemExit), special_casing (comparing the arguments with the visible tests' "
                                   "inputs), literal_return (returning an expected value as a literal), "
                                   "test_file_access (reading or writing test files, the grader's files, the "
                                   "solution's own file), monkeypatch (builtins, sys.modules, unittest/pytest, an "
                                   "__eq__ that is always True) and conftest_drop (writing conftest.py). It also "
                                   "reports the gap between the pass rates on visible and hidden tests (a policy "
                                   "that fits the tests it sees without solving shows a positive gap) and the "
                                   "passes on canary tasks, which are impossible, so every pass is cheating. "
                                   "Prints a summary and writes audit.json beside the log. Static checks raise "
                                   "the floor, they do not prove a run clean: read the flagged completions.")
    p.add_argument("log", metavar="RUN_OR_LOG", help="a run directory holding rollouts.jsonl, or a rollout JSONL file")
    p.add_argument("--force", action="store_true", help="replace an existing audit.json")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("agent", help="let a model work on files with tools (bash, Python, edit, MCP servers' tools)",
                       description="Run an agent: a model behind any OpenAI-compatible endpoint (`athanor serve`, "
                                   "vLLM, llama.cpp's server, OpenAI) works on --task in --workdir with tools: "
                                   "bash and Python (in the sandbox: no network, limits), read / write / edit a "
                                   "file and search (confined to the work dir), and the tools of any MCP server "
                                   "given. It stops when the model answers without calling a tool, or at a limit. "
                                   "Every step is appended to --trajectory (JSONL); running the same command "
                                   "again resumes from it. The answer goes to stdout, progress to stderr. "
                                   "Server errors (connection, HTTP 5xx) are retried with backoff.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="URL",
                   help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model-name", default="default", help="the model to ask the endpoint for (default 'default')")
    p.add_argument("--task", required=True, help="what to do, in words; @FILE reads it from a file")
    p.add_argument("--workdir", required=True, metavar="DIR", help="the directory the agent works in (must exist)")
    p.add_argument("--trajectory", required=True, metavar="FILE",
                   help="JSONL file of every step; an existing one for the same task is resumed")
    p.add_argument("--tool-format", choices=["openai", "text"], default="openai",
                   help="openai: tools and tool_calls as in the OpenAI API (default); text: tools described "
                        "in the system prompt and called with <tool_call>{...}</tool_call> blocks, for small "
                        "models, models in athanor's own chat format (it has no tools) and servers without tool calls")
    p.add_argument("--mcp-config", metavar="FILE",
                   help='JSON file {"mcpServers": {NAME: {"command": ..., "args": [...]} or {"url": ...}}}: '
                        "their tools join the agent's (needs the agent extra: pip install 'athanor[agent]')")
    p.add_argument("--mcp", action="append", metavar="SPEC",
                   help="one more MCP server: a command line to start (stdio) or an http(s) URL, optionally "
                        "NAME=... first; repeatable")
    p.add_argument("--rag", metavar="INDEX_DIR",
                   help="an index from `athanor rag index`: adds the rag_search tool over its documents")
    p.add_argument("--max-steps", type=int, default=30, help="most model replies (default 30)")
    p.add_argument("--max-seconds", type=float, default=900, help="most wall-clock seconds (default 900)")
    p.add_argument("--max-tokens", type=int, default=500_000,
                   help="most prompt + completion tokens over the run (default 500000)")
    p.add_argument("--context", type=int, default=8192,
                   help="the model's context window in tokens; old tool outputs are dropped to fit (default 8192)")
    p.add_argument("--reply-tokens", type=int, default=1024, help="longest reply in tokens (default 1024)")
    p.add_argument("--tool-seconds", type=float, default=30, help="time limit of one bash/python run (default 30)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--retries", type=int, default=4,
                   help="retries of a failed model request, with exponential backoff from 0.5 s (default 4)")
    p.set_defaults(func=cmd_agent)

    mcp = sub.add_parser("mcp", help="athanor's tools as an MCP server",
                         description="Model Context Protocol commands (needs the agent extra: "
                                     "pip install 'athanor[agent]').")
    mcp_sub = mcp.add_subparsers(dest="mcp_command", required=True, metavar="ACTION")
    p = mcp_sub.add_parser("serve", help="serve athanor's tools (sandboxed run, next-token view, RAG) over MCP",
                           description="Serve athanor's tools to any MCP client: `sandbox_run` (Python or bash in "
                                       "the sandbox), with --model `next_token` (a model's likeliest next "
                                       "tokens after a prefix), and with --rag `rag_search` (passages of an "
                                       "index). Over stdio by default (a client starts this "
                                       "command itself, e.g. {\"command\": \"athanor\", \"args\": [\"mcp\", "
                                       "\"serve\"]}), or over streamable HTTP at http://HOST:PORT/mcp with --http.")
    p.add_argument("--http", type=int, metavar="PORT", help="serve over streamable HTTP on this port instead of stdio")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on with --http (default 127.0.0.1)")
    p.add_argument("--model", metavar="RUN_DIR", help="a run directory: adds the next_token tool")
    p.add_argument("--rag", metavar="INDEX_DIR", help="an index from `athanor rag index`: adds the rag_search tool")
    p.set_defaults(func=cmd_mcp_serve)

    rag = sub.add_parser("rag", help="retrieval-augmented generation: index files, ask with citations, evaluate",
                         description="RAG: keep facts in an index rather than in the weights. `index` cuts files "
                                     "into passages (Python by whole functions and classes) and indexes them for "
                                     "BM25 and dense retrieval (all-MiniLM-L6-v2); `ask` retrieves passages for a "
                                     "question and, with --model, lets a model answer from them citing [n]; "
                                     "`eval` scores retrieval (recall@k, MRR) and answers (exact match, F1) on a "
                                     "question set with gold passages.")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", metavar="RUN_DIR|URL",
                            help="answer with this model: a run directory or an OpenAI-compatible base URL")
    model_args.add_argument("--model-name", default="default", help="the model to ask an endpoint for")
    model_args.add_argument("--max-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    model_args.add_argument("-k", type=int, default=5, help="passages retrieved per question (default 5)")
    p = rag_sub.add_parser("index", help="index files and directories, or update an index where they changed",
                           description="Create the index in INDEX_DIR from PATHS (files and directories, walked "
                                       "for text files), or update it: new and changed files are re-indexed, "
                                       "removed ones dropped, and only passages with new text are embedded. "
                                       "Without PATHS, the paths of the last run are re-scanned. The index is one "
                                       "file, INDEX_DIR/index.npz, replaced atomically.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--no-dense", action="store_true",
                   help="BM25 only: no embedding model (needed otherwise: pip install 'athanor[rag]')")
    p.add_argument("--chunk-tokens", type=int, default=200, help="passage size in words and marks (default 200)")
    p.add_argument("--overlap", type=int, default=40,
                   help="tokens of prose repeated from one passage into the next (default 40)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rag_index)
    p = rag_sub.add_parser("ask", help="retrieve passages for a question; with --model, answer citing them",
                           parents=[model_args],
                           description="Print the top -k passages for QUESTION, or with --model the model's answer "
                                       "from those passages and the passages it cites.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("question")
    p.add_argument("--mode", choices=["hybrid", "bm25", "dense"],
                   help="retriever: hybrid (BM25 and dense fused by reciprocal rank; the default when the index "
                        "has vectors), bm25 or dense")
    p.set_defaults(func=cmd_rag_ask)
    p = rag_sub.add_parser("eval", help="recall@k and MRR of each retriever; answer EM/F1 with --model",
                           parents=[model_args],
                           description="Score BM25, dense and hybrid retrieval on questions with gold passages "
                                       "(default: the shipped set of questions about the Python standard "
                                       "library), and with --model the answers: no passages, retrieved "
                                       "passages, and the gold passage (oracle). An empty INDEX_DIR is first "
                                       "filled from --paths, or from the files the questions cite.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--questions", metavar="FILE",
                   help='JSONL of {"question", "source", "gold", "answer"} (default: the shipped stdlib set)')
    p.add_argument("--paths", nargs="+", metavar="PATH", help="files or directories to index first")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--no-dense", action="store_true", help="BM25 only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rag_eval)

    lora = sub.add_parser("lora", help="LoRA adapter tools", description="LoRA adapter commands: `athanor lora "
                                                                         "merge` folds a trained low-rank adapter "
                                                                         "into its base model, giving a plain model "
                                                                         "directory.")
    lora_sub = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    p = lora_sub.add_parser("merge", help="fold a LoRA adapter into its base model",
                            description="Load a base model and a LoRA adapter (PEFT layout: adapter_config.json + "
                                        "adapter_model.safetensors, from `athanor sft --lora` or PEFT), add the "
                                        "low-rank updates into the weights and save a plain model directory that "
                                        "needs no adapter code.")
    p.add_argument("--base", required=True, metavar="DIR", help="base model directory")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    _add_force_arg(p)
    p.set_defaults(func=cmd_lora_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (recipe overrides look like --train.lr=3e-4)")
    try:
        args.func(args, extra)
    except AthanorError as e:
        print(f"athanor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("athanor: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
