"""Quantization speed: athanor vs its peers, side by side.

1. Quantize throughput (million weights/s) of athanor's torch quantizers vs gguf-py's numpy
   ones (`gguf.quants.quantize`, bit-exact references) on the same matrix, for the types gguf-py
   can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), eager and `compile=True` side by side (the
   compiling first call timed apart); athanor's K-quants (which gguf-py cannot quantize) are
   timed alone. Goal (issue 5): at least 5x.
2. Decode tokens/s at batch 1, greedy, of athanor's quantized modules vs llama.cpp
   (llama-cpp-python, when installed) on the same GGUF file, for Q8_0 and Q4_0 (and F32):
   athanor with exact dequantized products, and with torch's int4 kernel in bf16
   (`quantize_model(kernel=True)`, rows "+int4k"). `--decode-shape` swaps in random weights
   of a bigger shape (with the run's tokenizer), where streaming the weights dominates.
3. `--error-vs-llama-cpp`: RMSE of athanor's K-quants against llama.cpp's own quantizer
   (`llama_model_quantize`, pure, no importance matrix) on the same F32 weights, for normal
   weights and two outlier-heavy kinds (Student-t with 3 degrees of freedom; normal with 0.5%
   of the weights scaled 20x): the ratio athanor / llama.cpp per type (below 1: athanor closer).

Rounds alternate between the two sides; medians are printed with the ratio.

    python benchmarks/quant.py                           # the speedrun model shape, random weights
    python benchmarks/quant.py --run-dir runs/speedrun   # a trained run directory
    python benchmarks/quant.py --run-dir runs/speedrun --decode-shape 1024,2816,8 --skip-quantize
    python benchmarks/quant.py --error-vs-llama-cpp --skip-quantize --skip-decode
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from athanor.model.hf import load_pretrained, save_pretrained
from athanor.model.llama import LlamaModel, ModelConfig
from athanor.quant.formats import quantize
from athanor.quant.gguf import export_gguf
from athanor.quant.linear import model_nbytes, quantize_model, quantize_weights
from athanor.serve.engine import Engine
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer, TokenizerConfig


def _median_time(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _greedy(model: LlamaModel, prompt: list[int], tokens: int) -> None:
    """One greedy generation on a fresh engine (its cache allocated inside the timing, as before)."""
    Engine(model, max_batch=1, max_len=len(prompt) + tokens).generate([prompt], SamplingParams(max_tokens=tokens,
                                                                                               temperature=0))


def bench_quantize(rows: int, cols: int, rounds: int) -> None:
    import gguf
    from gguf import quants as gq

    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    xt = torch.from_numpy(x)
    mw = rows * cols / 1e6
    print(f"\n## quantize throughput, {rows}x{cols} float32 matrix, M weights/s: athanor on "
          f"{torch.get_num_threads()} torch thread(s), gguf-py's numpy code on one (it has no threads): "
          "compare like with like at --threads 1")
    print("(+compile: `quantize(..., compile=True)`, torch.compile'd graphs; its first call, which compiles, "
          "is timed apart)")
    print(f"{'type':8} {'athanor':>10} {'+compile':>10} {'gguf-py':>10} {'ratio':>7} {'ratio+c':>8} {'compile s':>10}")
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
        t = time.perf_counter()
        quantize(xt, name, compile=True)
        compile_s = time.perf_counter() - t
        ours, compiled, theirs = [], [], []
        for _ in range(rounds):  # alternate the sides, round by round
            ours.append(_median_time(lambda n=name: quantize(xt, n), 1))
            compiled.append(_median_time(lambda n=name: quantize(xt, n, compile=True), 1))
            theirs.append(_median_time(lambda n=name: gq.quantize(x, gguf.GGMLQuantizationType[n]), 1))
        a, c, b = (mw / statistics.median(v) for v in (ours, compiled, theirs))
        print(f"{name:8} {a:10.1f} {c:10.1f} {b:10.1f} {a / b:6.1f}x {c / b:7.1f}x {compile_s:10.1f}")
    for name in ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]:
        a = mw / _median_time(lambda n=name: quantize(xt, n), max(1, rounds // 2))
        print(f"{name:8} {a:10.1f} {'':>10} {'(cannot)':>10}")


def _toy_run(out: Path) -> Path:
    """The speedrun's model shape with random weights and a small tokenizer (when no run is given)."""
    from athanor.data.corpus import DataConfig, iter_documents

    torch.manual_seed(0)
    tok = Tokenizer.train((d.text for d in iter_documents(DataConfig(max_chars=2_000_000))),
                          TokenizerConfig(vocab_size=4096, max_train_chars=2_000_000), show_progress=False)
    model = LlamaModel(ModelConfig(vocab_size=tok.vocab_size))
    save_pretrained(model, out)
    tok.save(out)
    return out


# Weight distributions for the error comparison: (name, draw(shape, generator)).
_DISTRIBUTIONS = {
    "normal": lambda shape, g: torch.randn(shape, generator=g),
    "student-t3": lambda shape, g: torch.distributions.StudentT(3.0).sample(shape),
    "outliers-0.5%x20": lambda shape, g: torch.randn(shape, generator=g)
    * torch.where(torch.rand(shape, generator=g) < 0.005, 20.0, 1.0),
}
_FTYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}  # llama_ftype of the pure types


def bench_error_vs_llama_cpp(run_dir: Path, tmp: Path) -> None:
    import ctypes

    import gguf
    import llama_cpp

    from athanor.quant.gguf import hf_name_of, rope_permute

    print("\n## K-quant RMSE, athanor / llama.cpp's quantizer (pure, no imatrix), same F32 weights, all 2-D "
          "tensors of the model pooled")
    print(f"{'weights':18}" + "".join(f"{t:>8}" for t in _FTYPES))
    for dist, draw in _DISTRIBUTIONS.items():
        model = load_pretrained(run_dir)
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(draw(p.shape, g) * 0.02)
        src = tmp / f"w-{dist}"
        save_pretrained(model, src)
        Tokenizer.load(run_dir).save(src)
        f32 = tmp / f"{dist}-f32.gguf"
        export_gguf(src, f32, "F32", model=model)
        state = model.state_dict()
        cells = []
        for qtype, ftype in _FTYPES.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.pure, params.nthread = ftype, True, torch.get_num_threads()
            out = tmp / f"{dist}-{qtype}.gguf"
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
            ours = quantize_weights(model, qtype)
            err_ours = err_theirs = 0.0
            for t in gguf.GGUFReader(out).tensors:
                hf = hf_name_of(t.name)
                if hf is None or t.tensor_type.name != qtype:
                    continue
                ref = state[hf].float()
                blocks = torch.from_numpy(np.asarray(t.data).reshape(ours[hf].rows, -1).copy())
                if ".q_proj." in hf or ".k_proj." in hf:  # llama.cpp's rows are in the GGUF (permuted) order
                    c = model.config
                    blocks = rope_permute(blocks, c.num_attention_heads if ".q_proj." in hf else
                                          c.num_key_value_heads, inverse=True)
                theirs = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), t.tensor_type)).view(ref.shape)
                err_theirs += float(((theirs - ref) ** 2).sum())
                err_ours += float(((ours[hf].dequantize().view(ref.shape) - ref) ** 2).sum())
            cells.append(f"{(err_ours / err_theirs) ** 0.5:8.4f}")
        print(f"{dist:18}" + "".join(cells))


def _bigger_run(run_dir: Path, shape: str, out: Path) -> Path:
    """Random weights of shape HIDDEN,INTERMEDIATE,LAYERS (64-dim heads, 4 query heads per KV
    head) with run_dir's tokenizer: speed only, the text it writes is noise."""
    hidden, inter, layers = (int(v) for v in shape.split(","))
    tok = Tokenizer.load(run_dir)
    torch.manual_seed(0)
    heads = hidden // 64
    model = LlamaModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 4)))
    save_pretrained(model, out)
    tok.save(out)
    return out


def bench_decode(run_dir: Path, tokens: int, rounds: int, tmp: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("\n(llama-cpp-python not installed: athanor side only)")
    tok = Tokenizer.load(run_dir)
    prompt = tok.encode_prompt("def main():\n    ")
    print(f"\n## decode tokens/s, batch 1, greedy, {tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"{'type':11} {'athanor':>10} {'llama.cpp':>10} {'ratio':>7}")
    for scheme in ["F32", "Q8_0", "Q4_0"]:
        path = tmp / f"m-{scheme}.gguf"
        export_gguf(run_dir, path, scheme)
        models = {scheme: load_pretrained(run_dir).eval()}
        if scheme != "F32":
            weights = quantize_weights(models[scheme], scheme)
            models = {scheme: quantize_model(load_pretrained(run_dir).eval(), scheme, weights=weights),
                      f"{scheme}+int4k": quantize_model(models[scheme], scheme, weights=weights, kernel=True)}
        llm = None
        if llama_cpp is not None:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)

        def theirs(llm=llm) -> None:
            llm.reset()
            for n, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), 1):
                if n == tokens:
                    break

        ours_t, theirs_t = {name: [] for name in models}, []
        for _ in range(rounds):
            for name, model in models.items():
                ours_t[name].append(_median_time(lambda m=model: _greedy(m, prompt, tokens), 1))
            if llm is not None:
                theirs_t.append(_median_time(theirs, 1))
        b = tokens / statistics.median(theirs_t) if llm is not None else None
        if llm is not None:
            llm.close()
        for name, times in ours_t.items():
            a = tokens / statistics.median(times)
            mb = model_nbytes(models[name]) / 1e6
            peer = f"{b:10.1f} {a / b:6.2f}x" if b else f"{'-':>10}"
            print(f"{name:11} {a:10.1f} {peer}   ({mb:.1f} MB of weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--run-dir", type=Path, help="run directory for decode (default: random speedrun-shaped model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to decode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--error-vs-llama-cpp", action="store_true",
                    help="K-quant RMSE against llama.cpp's quantizer on normal and outlier-heavy weights")
    ap.add_argument("--decode-shape", help="HIDDEN,INTERMEDIATE,LAYERS: decode random weights of this shape "
                                           "with the run's tokenizer (e.g. 1024,2816,8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_quantize:
        bench_quantize(args.rows, args.cols, args.rounds)
    if args.error_vs_llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            bench_error_vs_llama_cpp(args.run_dir or _toy_run(Path(tmp) / "run"), Path(tmp))
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = args.run_dir or _toy_run(Path(tmp) / "run")
            if args.decode_shape:
                run_dir = _bigger_run(run_dir, args.decode_shape, Path(tmp) / "bigger")
                print(f"\n(decode: random weights, shape {args.decode_shape}, {run_dir} tokenizer)")
            bench_decode(run_dir, args.tokens, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
