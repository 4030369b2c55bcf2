"""PPO's policy: the language model with a value head on its final hidden states.

The value function shares the policy's trunk, as InstructGPT's PPO code and TRL's
`AutoModelForCausalLMWithValueHead` (`v_head`, a Linear(hidden, 1) with a bias) do, rather than
being a second model initialised from the reward model: one trunk forward gives both the token
log-probs and the values, and only one trainable model is held in memory, which is what makes PPO
fit a CPU. The cost is that the value loss also moves the shared trunk; `vf_coef` (0.1, TRL's
default) keeps it from outweighing the policy loss.

The value of the state before response token t is read where the model predicts token t, the
same position whose log-prob is scored. The head starts at zero (every value 0, so the first
advantages are the returns themselves) and is dropped when the tuned model is saved: inference
needs only the language model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from athanor.model.linear_ce import linear_token_logprobs
from athanor.model.llama import LlamaModel, ModelConfig


class PolicyWithValue(LlamaModel):
    """A `LlamaModel` (same forward, so the engine samples from it) plus `v_head`; `forward(..., values=True)`
    returns (token log-probs, values), both (B, T), from one pass of the trunk."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.v_head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    @classmethod
    def from_language_model(cls, lm: LlamaModel) -> PolicyWithValue:
        """`lm`'s modules (taken over, not copied) with a zero value head on their device."""
        with torch.device("meta"):
            policy = cls(lm.config)
        _take_over(policy, lm)
        policy.v_head = nn.Linear(lm.config.hidden_size, 1, device=lm.rope_cos.device,
                                  dtype=lm.model.embed_tokens.weight.dtype)
        nn.init.zeros_(policy.v_head.weight)
        nn.init.zeros_(policy.v_head.bias)
        return policy

    def language_model(self) -> LlamaModel:
        """The policy without its value head (its modules, not copies): what is saved."""
        with torch.device("meta"):
            lm = LlamaModel(self.config)
        _take_over(lm, self)
        return lm

    def forward(self, input_ids: torch.Tensor, *args: Any, values: bool = False, temperature: float = 1.0,
                **kw: Any) -> Any:
        """With `values`: `targets` (B, T; -100 outside the response) is required and the result is each
        position's log-prob of its target under logits / `temperature` (0 where -100) and the value
        there. Otherwise LlamaModel's forward."""
        if not values:
            return super().forward(input_ids, *args, **kw)
        targets = kw.pop("targets")
        return self.heads(self.hidden_states(input_ids, *args, **kw), targets, temperature)

    def heads(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token log-probs, values) from the trunk's output `hidden` (B, T, hidden): see `forward`."""
        # logits / T = (hidden / T) W^T: the temperature goes into the fused head's input.
        logps = linear_token_logprobs((hidden / temperature).reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                      targets.reshape(-1)).view(targets.shape)
        return logps, self.v_head(hidden).squeeze(-1).float()


def _take_over(dst: LlamaModel, src: LlamaModel) -> None:
    """`dst` runs on `src`'s trunk and head (the tie of head and embeddings kept) and rotary tables."""
    dst.model, dst.lm_head = src.model, src.lm_head
    dst.rope_cos, dst.rope_sin = src.rope_cos, src.rope_sin
