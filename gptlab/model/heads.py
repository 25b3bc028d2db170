"""A GPT with a scalar head: the reward model (one score per sequence, read at the last real
token) and the PPO value model (one value per position).

A reward model imported from a Hugging Face `*ForSequenceClassification` reads its score where
transformers does: at the last token that is not its config's `pad_token_id` (`pad_token_id`
here), of the conversation as the chat template renders it whole (`reads_template_tail`: the
response, its end of turn, then the template's text after it, ChatML's "\\n"). That is how TRL's
RewardTrainer tokenizes a conversational preference (`apply_chat_template` of prompt + answer,
checked in trl 1.12.0): a ChatML model was trained to score the "\\n" after the `<|im_end|>` that
closes the response, whether its pad is that `<|im_end|>` (SmolLM2) or a token of its own."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from gptlab.model.attention import PrefixKV
from gptlab.model.gpt import GPT, GPTConfig


def last_real_index(attention_mask: Tensor) -> Tensor:
    """Index (B,) of the last 1 in each row of the mask: works for left and right padding."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(1).argmax(1)


def last_scored_index(input_ids: Tensor, attention_mask: Tensor,
                      pad_token_id: int | None) -> tuple[Tensor, Tensor]:
    """(index (B,), found (B,)): the last real token of each row that is not `pad_token_id`
    (any real token when it is None), and whether the row has one at all."""
    ok = attention_mask.bool()
    if pad_token_id is not None:
        ok = ok & (input_ids != pad_token_id)
    return last_real_index(ok), ok.any(1)


def has_scored_token(tokens: Iterable[int], pad_token_id: int | None) -> bool:
    """`last_scored_index`'s `found` for one row, from its real tokens on the host: whether it
    has one that is not `pad_token_id` (any, when it is None)."""
    return any(t != pad_token_id for t in tokens)


class ScalarHeadModel(nn.Module):
    """`backbone` is a GPT (its LM head stays, unused, so SFT weights load as they are);
    `head` maps each final hidden state to one number. `score_bias` / `score_scale` normalise the
    reward so that SFT samples score mean 0, std 1 (set after training the reward model)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.backbone = GPT(config)
        self.head = nn.Linear(config.d_model, 1)
        # InstructGPT-style init: N(0, 1/sqrt(d+1)) keeps initial scores O(1).
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.d_model + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("score_bias", torch.zeros(()))
        self.register_buffer("score_scale", torch.ones(()))
        # The token id the score is never read at (trailing pads, as transformers pools);
        # None: the last real token. Saved in config.json.
        self.pad_token_id: int | None = None
        # Whether a response is scored with the chat template's text after its end of turn
        # (`template_tail`), as whole conversations are (a Hugging Face classifier's). Saved.
        self.reads_template_tail = False

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "ScalarHeadModel":
        model = cls(gpt.config)
        model.backbone.load_state_dict(gpt.state_dict())
        return model.to(next(gpt.parameters()).device)

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """Fold `score_bias` / `score_scale` into the head, so that `values` reads on the
        normalised scale too (the PPO value model, copied from the reward model, must predict
        the rewards PPO is paid in); `forward` is unchanged."""
        self.head.weight.mul_(self.score_scale)
        self.head.bias.sub_(self.score_bias).mul_(self.score_scale)
        self.score_bias.zero_()
        self.score_scale.fill_(1.0)

    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               cache: PrefixKV | None = None, right_padded: bool | None = None) -> Tensor:
        """One raw scalar per position (B, T): the value model's V(s_t). With `cache`, the
        positions follow an encoded prefix (`attention_mask` then covers both).
        `right_padded` as in `GPT.hidden_states`."""
        h, _ = self.backbone.hidden_states(input_ids, attention_mask, cache=cache,
                                           right_padded=right_padded)
        return self.head(h).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: PrefixKV | None = None, right_padded: bool | None = None) -> Tensor:
        """The normalised score (B,) of each sequence, read at its last real token (that is
        not `pad_token_id`; a row of nothing else is read at its last real token)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        v = self.values(input_ids, attention_mask, cache, right_padded)
        own = attention_mask[:, -input_ids.shape[1]:]
        last, found = last_scored_index(input_ids, own, self.pad_token_id)
        last = torch.where(found, last, last_real_index(own))
        raw = v.gather(1, last[:, None])[:, 0]
        return (raw - self.score_bias) * self.score_scale

    def score_continuations(self, prompt_ids: Tensor, prompt_mask: Tensor, rows: Tensor,
                            cont_ids: Tensor, cont_mask: Tensor, rows_host: list[int] | None = None,
                            scored: bool | None = None) -> Tensor:
        """Scores (N,) of N continuations of B shared prompts, each prompt encoded once.

        prompt_ids/mask (B, P) left-padded; rows (N,) the prompt of each continuation;
        cont_ids/mask (N, R) right-padded, every row at least one real token. Equal to
        `forward` on the concatenated sequences (up to float rounding).

        What the caller knows on the host, where it built the batch, spares a read of the
        device (on a GPU, a wait): `rows_host`, `rows` as a list; `scored`, whether every
        continuation has a token to read its score at (`has_scored_token`). Where the
        sequences themselves are scored (see below), their lengths are read once."""
        last, found = last_scored_index(cont_ids, cont_mask, self.pad_token_id)
        if scored is None:
            scored = bool(found.all())
        if prompt_ids.shape[1] + cont_ids.shape[1] > self.config.context or not scored:
            # The longest prompt plus the longest continuation overflow the context, though
            # every real sequence fits, or a continuation is all pad tokens (its score is read
            # in the prompt): score the sequences themselves, right-padded.
            rows_host = rows.tolist() if rows_host is None else rows_host
            # A prompt's real tokens end its row, a continuation's start its own: their
            # counts, read together once, place them (a row indexed by its mask read the
            # device twice a sequence, and the built batch's padding twice more).
            P, counts = prompt_ids.shape[1], torch.cat([prompt_mask.sum(1),
                                                        cont_mask.sum(1)]).tolist()
            seqs = [torch.cat([prompt_ids[r, P - counts[r]:], c[:n]])
                    for r, c, n in zip(rows_host, cont_ids, counts[len(prompt_ids):])]
            T = max(len(x) for x in seqs)
            ids = prompt_ids.new_zeros((len(seqs), T))
            mask = prompt_mask.new_zeros((len(seqs), T))
            for i, x in enumerate(seqs):
                ids[i, :len(x)], mask[i, :len(x)] = x, 1
            return self(ids, mask, right_padded=True)
        prefix = PrefixKV()
        self.backbone.hidden_states(prompt_ids, prompt_mask, cache=prefix)
        mask = torch.cat([prompt_mask[rows], cont_mask], 1)
        h, _ = self.backbone.hidden_states(cont_ids, mask, cache=prefix.expand(
            rows if rows_host is None else rows_host))
        raw = self.head(h).squeeze(-1).float()
        raw = raw.gather(1, last[:, None])[:, 0]
        return (raw - self.score_bias) * self.score_scale


class ClassifierModel(nn.Module):
    """GPT-1's fine-tuning model: the pretrained GPT whole (its LM head kept, which the
    auxiliary language-modelling loss reads) and a linear layer from the final hidden state at
    each sequence's last real token to one logit per label (`labels`, their names)."""

    def __init__(self, config: GPTConfig, labels: Iterable[str] = ("0", "1")):
        super().__init__()
        self.config = config
        self.labels = [str(label) for label in labels]
        if len(self.labels) < 2 or len(set(self.labels)) < len(self.labels):
            raise ValueError(f"a classifier needs two or more distinct labels, got {self.labels}")
        self.backbone = GPT(config)
        self.head = nn.Linear(config.d_model, len(self.labels))
        nn.init.normal_(self.head.weight, std=0.02)  # GPT-1's initialisation, N(0, 0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT, labels: Iterable[str]) -> "ClassifierModel":
        model = cls(gpt.config, labels)
        model.backbone.load_state_dict(gpt.state_dict())
        return model.to(next(gpt.parameters()).device)

    def logits_and_lm(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      right_padded: bool | None = None) -> tuple[Tensor, Tensor]:
        """(label logits (B, labels), language-model logits (B, T, vocab)) of one forward."""
        logits, h = self._label_logits(input_ids, attention_mask, right_padded)
        return logits, self.backbone.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                right_padded: bool | None = None) -> Tensor:
        """Label logits (B, labels), read at each row's last real token."""
        return self._label_logits(input_ids, attention_mask, right_padded)[0]

    def _label_logits(self, input_ids: Tensor, attention_mask: Tensor | None,
                      right_padded: bool | None) -> tuple[Tensor, Tensor]:
        """(label logits (B, labels), the final hidden states (B, T, d) they were read from)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h, _ = self.backbone.hidden_states(input_ids, attention_mask, right_padded=right_padded)
        last = last_real_index(attention_mask)
        return self.head(h[torch.arange(h.shape[0], device=h.device), last]).float(), h
