import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from athanor.errors import AthanorError
from athanor.model.llama import LlamaModel
from athanor.train.dist import DistInfo
from athanor.train.loop import Checkpoints, TrainConfig, Trainer, lr_at

CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


class FixedBatches:
    """A stage over a fixed list of (inputs, targets) batches, cycling; targets may hold -100."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def loss_tokens(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def loss_sum(self, model, batch):
        return model(batch[0], targets=batch[1]), {}

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state) -> None:
        self.i = state["i"]


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=1, lr=1e-2, warmup_steps=0, schedule="constant", eval_every=0, ckpt_every=0,
                log_every=1, weight_decay=0.0, grad_clip=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_schedules() -> None:
    cos = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(99, cos) == pytest.approx(0.1, abs=1e-3) and lr_at(55, cos) == pytest.approx(0.55, abs=1e-6)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)


def _trainer(tmp_path: Path, batches, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(LlamaModel(tiny_model_config()), FixedBatches(batches), _cfg(**kw), tmp_path, CPU,
                   show_progress=False)


def test_grad_accumulation_is_token_weighted(tmp_path: Path) -> None:
    """Two micro-batches with very different numbers of counted tokens give the gradient of the
    mean over all tokens, exactly as one batch holding both; not a mean of micro-batch means."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (4, 16), generator=g)
    y = torch.randint(0, 512, (4, 16), generator=g)
    y[:2, 2:] = -100  # the first micro-batch counts 4 tokens, the second 32
    whole = _trainer(tmp_path / "a", [(x, y)])
    split = _trainer(tmp_path / "b", [(x[:2], y[:2]), (x[2:], y[2:])], grad_accum=2)
    loss_a, tokens_a, _ = whole.accumulate_gradients()
    loss_b, tokens_b, _ = split.accumulate_gradients()
    assert tokens_a == tokens_b == 36 and loss_a == pytest.approx(loss_b, rel=1e-6)
    for p, q in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)
    # The wrong recipe (average the two micro-batch means) gives a visibly different gradient.
    naive = _trainer(tmp_path / "c", [])
    for xb, yb in ((x[:2], y[:2]), (x[2:], y[2:])):
        (naive.model(xb, targets=yb) / int((yb != -100).sum()) / 2).backward()
    emb = whole.model.model.embed_tokens.weight.grad
    assert (naive.model.model.embed_tokens.weight.grad - emb).abs().max() > 10 * 1e-7


def test_a_step_changes_the_weights_version(tmp_path: Path) -> None:
    """Caches built from the weights (the engine's fast path, LocalLM) rebuild when `weights_version`
    changes: an optimizer step must change it, or a stage that samples between steps samples stale weights."""
    from athanor.model.llama import weights_version

    x = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    trainer = _trainer(tmp_path, [(x, x)])
    before = weights_version(trainer.model)
    trainer.train_step()
    assert weights_version(trainer.model) != before


def test_all_zero_loss_mask_is_an_error(tmp_path: Path) -> None:
    x = torch.randint(0, 512, (2, 8))
    with pytest.raises(AthanorError, match="mask"):
        _trainer(tmp_path, [(x, torch.full((2, 8), -100))]).fit()


def test_nan_guard_skips_then_gives_up(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config())
    x = torch.randint(0, 512, (2, 8))
    trainer = Trainer(model, FixedBatches([(x, x)]), _cfg(max_steps=10, max_bad_steps=3), tmp_path, CPU,
                      show_progress=False)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    record = trainer.train_step()
    assert record["skipped"] == 1.0 and math.isnan(record["loss"])
    assert all(p.grad is None for p in model.parameters())  # the update was dropped
    with pytest.raises(AthanorError, match="non-finite"):
        trainer.train_step()
        trainer.train_step()


def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, capsys) -> None:
    ck = Checkpoints(tmp_path, keep=3)
    ck.save({"step": 1}, 1)
    ck.save({"step": 2}, 2)
    (tmp_path / "checkpoints" / "step_00000002.pt").write_bytes(b"\x00garbage")
    assert ck.load_latest() == {"step": 1}
    assert "unreadable checkpoint" in capsys.readouterr().out
    ck.save({"step": 3}, 3)
    ck.save({"step": 4}, 4)
    assert [p.name for p in ck.paths()] == ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt"]


def test_resume_in_process_is_bitwise(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 512, (2, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g))
               for _ in range(5)]

    def run(out: Path, steps: int) -> LlamaModel:
        torch.manual_seed(0)
        model = LlamaModel(tiny_model_config())
        cfg = _cfg(max_steps=steps, ckpt_every=3, schedule="cosine", warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
        Trainer(model, FixedBatches(batches), cfg, out, CPU, show_progress=False).fit()
        return model

    straight = run(tmp_path / "a", 8)
    run(tmp_path / "b", 3)  # stops at a checkpoint
    resumed = run(tmp_path / "b", 8)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]
    assert steps == list(range(1, 9))


def test_fresh_start_drops_an_earlier_runs_checkpoints(tmp_path: Path) -> None:
    x = torch.randint(0, 512, (2, 8))
    _trainer(tmp_path, [(x, x)], max_steps=4, ckpt_every=2).fit()
    _trainer(tmp_path, [(x, x)], max_steps=2, ckpt_every=2, resume=False).fit()
    ck = Checkpoints(tmp_path, keep=3)
    assert [p.name for p in ck.paths()] == ["step_00000002.pt"]  # not the first run's step 4
    again = _trainer(tmp_path, [(x, x)], max_steps=3, ckpt_every=2)
    assert again.try_resume() and again.step == 2


def test_resume_removes_a_killed_runs_leftovers_and_prunes(tmp_path: Path) -> None:
    """What a SIGKILL leaves (tests/test_resume_kill.py makes it for real): a half-written hidden
    temporary, and one checkpoint over `keep_checkpoints` when the kill fell between a save and its
    pruning. The resumed run removes both, even when it has no step left to train."""
    x = torch.randint(0, 512, (2, 8))
    _trainer(tmp_path, [(x, x)], max_steps=2, ckpt_every=1, keep_checkpoints=2).fit()
    ck = Checkpoints(tmp_path, keep=0)  # keep=0: this save prunes nothing, like a kill right after it
    ck.save({**ck.load_latest(), "step": 3}, 3)
    leftover = ck.dir / ".step_00000004.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    resumed = _trainer(tmp_path, [(x, x)], max_steps=3, ckpt_every=1, keep_checkpoints=2)
    resumed.fit()
    assert resumed.resumed_from == 3
    assert [p.name for p in ck.paths()] == ["step_00000002.pt", "step_00000003.pt"]
    assert not leftover.exists()


def test_next_save_removes_a_half_written_checkpoint(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path, keep=2)
    ck.save({"step": 1}, 1)
    leftover = ck.dir / ".step_00000002.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    ck.save({"step": 2}, 2)
    assert not leftover.exists() and [p.name for p in ck.paths()] == ["step_00000001.pt", "step_00000002.pt"]
