"""The `athanor` command: one subcommand per stage. Thin: parse arguments, then call the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from athanor.errors import AthanorError

if TYPE_CHECKING:
    from athanor.train.pretrain import PretrainRecipe

OVERRIDES_HELP = """\
Settings come from the recipe's defaults, then the YAML file given with --recipe, then
--section.key=value overrides, e.g. --train.max_steps=200 --model.hidden_size=512
--data.paths=notes/*.md. Sections: tokenizer, data, model, train (see recipes/ for every key).
An unknown key is an error."""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", metavar="FILE", help="YAML recipe to start from (see recipes/)")
    p.add_argument("--out", metavar="DIR", help="run directory to write (same as --out_dir=DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_pretrain_recipe(args: argparse.Namespace, overrides: list[str], default_out: str) -> PretrainRecipe:
    from athanor.config import load_recipe
    from athanor.train.pretrain import PretrainRecipe

    recipe = load_recipe(PretrainRecipe, args.recipe, overrides)
    if args.out:
        recipe.out_dir = args.out
    elif recipe.out_dir == PretrainRecipe().out_dir:  # not set by the recipe file or an override
        recipe.out_dir = default_out
    return recipe


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from athanor.config import load_recipe
    from athanor.data.corpus import DataConfig, describe, is_held_out, iter_documents
    from athanor.tokenizer import Tokenizer, TokenizerConfig

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
    from athanor.speedrun import speedrun

    recipe = _load_pretrain_recipe(args, overrides, "runs/speedrun")
    report = speedrun(recipe, show_progress=not args.quiet)
    print(f"report: {report}")


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    import torch

    from athanor.model.hf import load_pretrained
    from athanor.serve.generate import generate
    from athanor.tokenizer import Tokenizer

    model = load_pretrained(args.run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.load(args.run_dir)
    prompt_ids = [tok.bos_id, *tok.encode(args.prompt)]
    for i in range(args.num_samples):
        ids = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       seed=None if args.seed is None else args.seed + i, stop_ids=[tok.bos_id, tok.eos_id])
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tok.decode(ids))


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise AthanorError(f"unrecognized arguments: {' '.join(overrides)}")
    from athanor.serve.server import serve

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
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (KV cache slots)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models "
                        "on a busy machine)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the batch-1 decode step: ~10-20 s on the first request, then faster "
                        "decoding of single requests (see BENCHMARKS.md)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--frame-ancestors", default="*",
                   help="CSP frame-ancestors: who may embed the demo page in an iframe "
                        "(default '*': anyone; \"'self'\" for this origin only)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="athanor",
        description="The whole life of a language model: tokenizer, pre-training, generation. "
                    "Start with `athanor speedrun`: it runs every stage on the embedded default corpus "
                    "(the Python standard library) and writes a report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("speedrun", help="run every stage end to end on the embedded default and write report.md",
                       description="Train a tokenizer and a small Llama-style model on the Python standard "
                                   "library, evaluate it on held-out files against a unigram baseline, sample "
                                   "from it, and write runs/speedrun/report.md. About 5 minutes on 2 CPU cores. "
                                   "A run directory that already holds checkpoints is resumed.\n\n" + OVERRIDES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_args(p)
    p.set_defaults(func=cmd_speedrun)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                         description="Tokenizer commands.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer and save tokenizer.json",
                           description="Train a GPT-2 style byte-level BPE on text (the Python stdlib by "
                                       "default) and save tokenizer.json + tokenizer_config.json (with the chat "
                                       "template) into --out, loadable by transformers' AutoTokenizer.")
    p.add_argument("--data", nargs="*", metavar="PATH", help="text files, directories, globs, .jsonl or .parquet")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary (default 4096)")
    p.add_argument("--max-chars", type=int, default=6_000_000, help="characters of text to learn merges from")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer into")
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
                       description="Continue a prompt with a model from a run directory (or any Llama/Qwen2 "
                                   "checkpoint in the Hugging Face layout).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample only from the k likeliest tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and the demo page)",
                       description="Start an HTTP server for a run directory: /v1/completions, "
                                   "/v1/chat/completions (streaming, logprobs, n, stop, seed), /v1/models, "
                                   "/health, /metrics (Prometheus) and the next-token demo page at /. Requests "
                                   "are batched continuously; shared prompt prefixes reuse their KV cache.")
    _add_serve_args(p)
    p = sub.add_parser("demo", help="the next-token demo page: watch the distribution as you type",
                       description="Serve the interactive next-token page (and the API) for a run directory; "
                                   "open the printed address in a browser. Add ?embed=1 for a compact view "
                                   "to put in an iframe.")
    _add_serve_args(p)

    p = sub.add_parser("chat", help="chat with a model in the terminal, answers streamed as they are generated",
                       description="A terminal chat with a run directory's model, using its chat template. "
                                   "/reset forgets the conversation, /quit or Ctrl-D leaves.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; higher = more random (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold; 1 = off (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable answers")
    p.set_defaults(func=cmd_chat)
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
