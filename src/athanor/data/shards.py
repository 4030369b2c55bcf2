"""Token shards: the corpus tokenized once into flat, memory-mapped arrays.

`train.bin` and `val.bin` hold token ids (uint16 when the vocabulary fits, else uint32),
each document preceded by BOS where the tokenizer adds one (as the model will read prompts), so
the model learns where documents start. `meta.json`, written last and atomically, records
what made them (corpus, tokenizer) and is the commit marker: shards without a matching
`meta.json` are rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from athanor.data.corpus import DataConfig, describe, is_held_out, iter_documents
from athanor.data.sampler import EpochSampler
from athanor.errors import AthanorError
from athanor.io import atomic_write_text
from athanor.tokenizer import Tokenizer

SPLITS = ("train", "val")


@dataclass
class ShardMeta:
    fingerprint: str
    dtype: str
    tokens: dict[str, int]
    documents: dict[str, int]
    bytes: dict[str, int]  # UTF-8 bytes of the documents in each split
    source: str


def _fingerprint(config: DataConfig, tokenizer: Tokenizer) -> str:
    import sys

    # How documents are kept apart is the post-processor's call, which the tokenizer's fingerprint leaves out.
    key = json.dumps({"data": asdict(config), "tokenizer": tokenizer.fingerprint(), "apart": _separators(tokenizer),
                      "python": sys.version if not config.paths else None}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _separators(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The tokens before and after each document, so that documents never run together in the stream:
    BOS before each where the tokenizer adds one (Llama, athanor's own), else EOS after each (GPT-2,
    Qwen, SmolLM2 ship no BOS; GPT-2's pre-training put its end-of-text token between documents)."""
    if tokenizer.add_bos:
        return [tokenizer.bos_id], []
    return [], [] if tokenizer.eos_id is None else [tokenizer.eos_id]


def _batched(docs: Iterator, n: int) -> Iterator[list]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_shards(config: DataConfig, tokenizer: Tokenizer, out_dir: str | Path,
                 show_progress: bool = True) -> ShardMeta:
    """Tokenize the corpus into `out_dir/{train,val}.bin`; reuse them if already built for the same inputs."""
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(config, tokenizer)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = ShardMeta(**json.loads(meta_path.read_text()))
        if meta.fingerprint == fingerprint and all((out_dir / f"{s}.bin").is_file() for s in SPLITS):
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    head, tail = _separators(tokenizer)
    tmp = {s: out_dir / f".{s}.bin.tmp" for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)
    nbytes = dict.fromkeys(SPLITS, 0)
    try:
        bar = tqdm(desc="tokenize", unit=" docs", disable=not show_progress)
        for batch in _batched(iter_documents(config), 256):
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
                split = "val" if is_held_out(doc.id, config.val_fraction) else "train"
                arr = np.asarray(head + ids + tail, dtype=dtype)
                arr.tofile(files[split])
                tokens[split] += arr.size
                documents[split] += 1
                nbytes[split] += len(doc.text.encode("utf-8"))
            bar.update(len(batch))
        bar.close()
    finally:
        for f in files.values():
            f.close()
    if tokens["train"] == 0 and tokens["val"] == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise AthanorError("the corpus is empty: no document has any text", path=describe(config))
    if documents["train"] == 0 or documents["val"] == 0:
        _split_by_tokens(tmp, dtype, head, config.val_fraction, tokens, documents, nbytes)
    # meta.json commits the pair: drop the old one first, so a kill between the two replaces
    # leaves shards that get rebuilt, never a new train split trusted with an old val split.
    meta_path.unlink(missing_ok=True)
    for s in SPLITS:
        with open(tmp[s], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp[s], out_dir / f"{s}.bin")
    meta = ShardMeta(fingerprint, np.dtype(dtype).name, tokens, documents, nbytes, describe(config))
    atomic_write_text(meta_path, json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def _split_by_tokens(tmp: dict[str, Path], dtype: type, head: list[int], val_fraction: float,
                     tokens: dict[str, int], documents: dict[str, int], nbytes: dict[str, int]) -> None:
    """Too few documents for a document-level split (one big file, say): hold out the tail
    `val_fraction` of the token stream instead, so there is always something to evaluate on
    (starting with `head`, the BOS a document starts with, if any)."""
    all_ids = np.concatenate([np.fromfile(tmp[s], dtype=dtype) for s in SPLITS])
    total_bytes = nbytes["train"] + nbytes["val"]
    cut = int(len(all_ids) * (1 - max(val_fraction, 0.01)))
    if cut < 2 or len(all_ids) - cut < 2:
        raise AthanorError(f"the corpus is too small to hold out anything ({len(all_ids)} tokens)")
    parts = {"train": all_ids[:cut], "val": np.concatenate([head, all_ids[cut:]]).astype(dtype)}
    for s in SPLITS:
        parts[s].tofile(tmp[s])
        tokens[s] = int(parts[s].size)
        documents[s] = max(documents[s], 1)
        nbytes[s] = int(total_bytes * tokens[s] / len(all_ids))


def load_meta(shard_dir: str | Path) -> ShardMeta:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise AthanorError("no token shards here (meta.json missing)", path=shard_dir)
    return ShardMeta(**json.loads(path.read_text()))


def open_tokens(shard_dir: str | Path, split: str) -> np.ndarray:
    meta = load_meta(shard_dir)
    return np.memmap(Path(shard_dir) / f"{split}.bin", dtype=np.dtype(meta.dtype), mode="r")


class TokenWindows:
    """Training batches of `seq_len + 1`-token windows, shuffled anew each epoch, resumable exactly.

    The stream is cut into non-overlapping windows (each shares one token with the next, the
    target of its last position); `EpochSampler` picks which windows each step and rank read.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.sampler = EpochSampler((len(tokens) - 1) // seq_len, batch_size, seed, rank, world,
                                    what=f"windows of {seq_len} tokens in the {len(tokens)}-token training split")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self.tokens[i * T:i * T + T + 1] for i in self.sampler.next_indices()]).astype(np.int64)
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches: at most `max_tokens` targets, in windows spread evenly over the whole
    split (the first N tokens would be one or two files, not a sample of the split)."""
    T = min(seq_len, len(tokens) - 1)
    total = (len(tokens) - 1) // T
    n = min(total, max(1, max_tokens // T))
    picks = np.linspace(0, total - 1, n).round().astype(np.int64)
    for b in range(0, n, batch_size):
        rows = np.stack([tokens[i * T:i * T + T + 1] for i in picks[b:b + batch_size]]).astype(np.int64)
        rows_t = torch.from_numpy(rows)
        yield rows_t[:, :-1], rows_t[:, 1:]
