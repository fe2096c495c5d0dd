"""The multimodal LM: projected `<audio>`/`<cover>` tokens spliced into any Hugging Face causal LM.

Placeholder convention (one rule shared by training, the transformers engine and the vLLM engine): a prompt
carries each placeholder token K times in a row (K = tokens per modality, see `expand_placeholders`), and the
n-th group of K placeholder ids in the batch (row-major order) is filled by the n-th feature row. Because the
sequence length never changes, the splice is a masked assignment into `inputs_embeds`, and the same embeddings
can be handed to vLLM as `prompt_embeds`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmrec.model.heads import EmbeddingHead, IDMappingHead
from llmrec.model.projector import ModalityProjector
from llmrec.text import AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN, build_embed_prompt

MM_WEIGHTS = "multimodal.safetensors"
IGNORE_INDEX = -100  # label of tokens without a loss (prompt, padding), as in transformers
MM_CONFIG = "multimodal.json"


@dataclass
class MediaBatch:
    """Feature rows for the placeholders of one batch, in placeholder order: feats [N, L, K, D], present [N].

    `text` [N, Dt]: sentence-encoder features of each embedding prompt's song, for a model that fuses them into the
    embedding head (`MMConfig.text_dim` > 0); only embedding batches carry it (one row per prompt)."""

    audio: torch.Tensor
    audio_present: torch.Tensor
    cover: torch.Tensor
    cover_present: torch.Tensor
    text: torch.Tensor | None = None

    @classmethod
    def cat(cls, batches: "list[MediaBatch]") -> "MediaBatch":
        """The rows of several batches in order, as `splice` fills the placeholders of the stacked prompts; `text`
        only when every batch has it."""
        texts = [b.text for b in batches]
        return cls(*(torch.cat([getattr(b, f) for b in batches]) for f in ("audio", "audio_present", "cover",
                                                                           "cover_present")),
                   text=torch.cat(texts) if texts and all(t is not None for t in texts) else None)


@dataclass
class MMConfig:
    projector: str
    audio_layers: int
    audio_tokens: int
    audio_dim: int
    cover_layers: int
    cover_tokens: int
    cover_dim: int
    embedding_dim: int
    cf_dim: int
    late_fusion: bool = True
    text_dim: int = 0  # sentence-encoder feature size fused into the embedding head (0 = none)
    text_encoder: str = ""  # which encoder made them (`features.text_encoder`): serving must use the same one


def expand_placeholders(text: str, audio_tokens: int, cover_tokens: int) -> str:
    """Repeat each placeholder K times so that its token count equals the number of projected vectors."""
    return text.replace(AUDIO_TOKEN, AUDIO_TOKEN * audio_tokens).replace(COVER_TOKEN, COVER_TOKEN * cover_tokens)


def prompt_token_ids(tokenizer, prompt: str, audio_tokens: int, cover_tokens: int) -> list[int]:
    """The token ids of a prompt: `[BOS] + tokenizer(expand_placeholders(prompt))`, no EOS. The one tokenisation
    rule of training (`llmrec.model.collate`), both serving engines and the server's usage counts."""
    text = expand_placeholders(prompt, audio_tokens, cover_tokens)
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids


def item_prompt(song, tokenizer, cfg: MMConfig, max_length: int, budget: int) -> str:
    """One song's embedding prompt — the one rule shared by training (`train.stages.item_prompts`) and serving
    (`serve.inputs`), so served embeddings match the trained ones. Both placeholders are always present (a missing
    modality gets the learned missing embedding, and late fusion sees one audio and one cover row per song); the
    text is sized with the real tokenizer to at most `budget` tokens (cfg.prompt.song_budget) and always fits
    `max_length` after each placeholder expands to K tokens."""
    expansion = 2 * (cfg.audio_tokens + cfg.cover_tokens) + 2
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return build_embed_prompt(song, media=lambda s: (True, True), count_tokens=count,
                              budget=min(budget, max_length - expansion)).text


class MultimodalLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, cfg: MMConfig):
        super().__init__()
        self.lm, self.tokenizer, self.cfg = lm, tokenizer, cfg
        hidden = lm.get_input_embeddings().embedding_dim
        self.audio_proj = ModalityProjector(cfg.projector, cfg.audio_layers, cfg.audio_tokens, cfg.audio_dim, hidden)
        self.cover_proj = ModalityProjector(cfg.projector, cfg.cover_layers, cfg.cover_tokens, cfg.cover_dim, hidden)
        fusion = (cfg.audio_dim, cfg.cover_dim) if cfg.late_fusion else (0, 0)
        self.embed_head = EmbeddingHead(hidden, cfg.embedding_dim, *fusion, text_dim=cfg.text_dim)
        self.id_head = IDMappingHead(cfg.embedding_dim, cfg.cf_dim)
        ids = tokenizer.convert_tokens_to_ids([AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN])
        if tokenizer.unk_token_id in ids:
            raise ValueError("tokenizer does not know the placeholder tokens "
                             f"{[AUDIO_TOKEN, COVER_TOKEN, EMBED_TOKEN]}")
        self.audio_id, self.cover_id, self.embed_id = ids

    # ---------------------------------------------------------------------------------------------- splice
    def prompt_token_ids(self, prompt: str) -> list[int]:
        """`prompt_token_ids` with this model's tokenizer and placeholder counts."""
        return prompt_token_ids(self.tokenizer, prompt, self.cfg.audio_tokens, self.cfg.cover_tokens)

    def _fill(self, embeds: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, name: str) -> torch.Tensor:
        n_slots, n_vecs = int(mask.sum()), tokens.shape[0] * tokens.shape[1]
        if n_slots != n_vecs:
            raise ValueError(f"batch has {n_slots} {name} placeholder tokens but {n_vecs} projected {name} vectors "
                             f"({tokens.shape[0]} songs x {tokens.shape[1]}); were placeholders expanded?")
        embeds = embeds.clone()
        embeds[mask] = tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype)
        return embeds

    def splice(self, input_ids: torch.Tensor, media: MediaBatch | None) -> torch.Tensor:
        """Token embeddings with every placeholder group replaced by its projected media vectors."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        audio_mask, cover_mask = input_ids == self.audio_id, input_ids == self.cover_id
        if media is None:
            if audio_mask.any() or cover_mask.any():
                raise ValueError("prompt has media placeholders but no media features were given")
            return embeds
        embeds = self._fill(embeds, audio_mask, self.audio_proj(media.audio, media.audio_present), "audio")
        return self._fill(embeds, cover_mask, self.cover_proj(media.cover, media.cover_present), "cover")

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids, attention_mask, labels=None, media: MediaBatch | None = None):
        """Causal-LM forward on spliced embeddings; `labels` are -100 outside the answer (answer-only loss)."""
        embeds = self.splice(input_ids, media)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def embed(self, input_ids, attention_mask, media: MediaBatch | None = None) -> torch.Tensor:
        """Song embeddings: hidden state at the last `<emb>` token of each prompt (+ late fusion), unit norm.

        For item prompts each row carries exactly one audio and one cover group, so media rows align with rows.
        """
        return self.head(self.embed_token_states(input_ids, attention_mask, media), media)

    def embed_token_states(self, input_ids, attention_mask, media: MediaBatch | None = None) -> torch.Tensor:
        """[N, H] the backbone's final hidden state at each prompt's last `<emb>` token: what the head reads."""
        return self._at_embed_token(self._final_hidden(input_ids, attention_mask, media), input_ids, attention_mask)

    def _final_hidden(self, input_ids, attention_mask, media: MediaBatch | None) -> torch.Tensor:
        """[N, T, H] final (normed) hidden states of the decoder on the spliced prompts — no LM head, so no
        vocabulary-sized logits for prompts that only need their hidden states."""
        embeds = self.splice(input_ids, media)
        return self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def _at_embed_token(self, hidden: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        """[N, H] hidden states at each row's last `<emb>` token."""
        is_emb = (input_ids == self.embed_id) & attention_mask.bool()
        if not bool(is_emb.any(1).all()):
            raise ValueError(f"every embedding prompt must contain the {EMBED_TOKEN} token")
        last = (is_emb * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def loss_and_embed(self, lm_batch: dict, embed_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer-only LM loss of `lm_batch`, song embeddings of `embed_batch`) from ONE pass through the backbone:
        the rows of both batches are stacked (right-padded to one width; pads are masked and carry no labels).

        Equal to `forward(...).loss` and `embed(...)` called apart, but each backbone layer runs once per step. That
        matters under ZeRO-3, which gathers a layer's partitioned weights for its forward and frees them after the
        layer's last pending backward — counted per module, and the count restarts at every forward. A layer run
        twice before one backward (the LM batch, then the songs) never reaches zero, so every frozen layer stays
        gathered until the backward pass ends: measured on CPU at 130M parameters, the whole frozen backbone
        (480 MB per process) resident at once, and steps twice as slow. One pass is also one larger batch, which
        accelerators prefer. Logits are computed for the LM rows only (a 125k-word vocabulary would otherwise cost
        rows x length x vocabulary floats for the song rows too).
        """
        n_lm = lm_batch["input_ids"].shape[0]
        width = max(lm_batch["input_ids"].shape[1], embed_batch["input_ids"].shape[1])

        def padded(batch: dict, key: str, value: int) -> torch.Tensor:
            x = batch[key]
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.cat([padded(lm_batch, "input_ids", pad_id), padded(embed_batch, "input_ids", pad_id)])
        attention_mask = torch.cat([padded(lm_batch, "attention_mask", 0), padded(embed_batch, "attention_mask", 0)])
        hidden = self._final_hidden(input_ids, attention_mask,
                                    MediaBatch.cat([lm_batch["media"], embed_batch["media"]]))
        logits = self.lm.get_output_embeddings()(hidden[:n_lm, :-1]).float()
        labels = padded(lm_batch, "labels", IGNORE_INDEX)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
        pooled = self._at_embed_token(hidden[n_lm:], input_ids[n_lm:], attention_mask[n_lm:])
        return loss, self.head(pooled, embed_batch["media"])

    def head(self, pooled: torch.Tensor, media: MediaBatch | None) -> torch.Tensor:
        """Embedding head on the `<emb>` hidden states [N, H] (+ late fusion of this batch's media rows).

        Split from `embed` so that a serving engine which computes the hidden states itself (vLLM's pooling runner
        returns the final hidden state of the last prompt token) applies exactly the same head."""
        return self.embed_head(pooled.float(), *self.head_branch_inputs(pooled.shape[0], media))

    def head_branch_inputs(self, n: int, media: MediaBatch | None) -> tuple[torch.Tensor | None, ...]:
        """(audio, cover, sentence) inputs of the embedding head's late-fusion branches for `n` embedding prompts:
        the pooled audio/cover summaries and the sentence-encoder rows (None where this model has no such branch).
        They do not depend on the backbone, which is what lets `train.head_refit` cache them beside its states."""
        audio = cover = text = None
        if self.cfg.text_dim:
            text = None if media is None else media.text
            if text is None or text.shape[0] != n:
                raise ValueError(f"this model fuses {self.cfg.text_encoder or 'sentence'}-encoder features into the "
                                 f"embedding: give one MediaBatch.text row per embedding prompt")
            text = text.float()
        if self.cfg.late_fusion and media is not None:
            if media.audio.shape[0] != n or media.cover.shape[0] != n:
                raise ValueError("late fusion needs exactly one audio and one cover row per embedding prompt")
            audio = self.audio_proj.pooled(media.audio, media.audio_present)
            cover = self.cover_proj.pooled(media.cover, media.cover_present)
        return audio, cover, text

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media: MediaBatch | None = None, max_new_tokens: int = 64,
                 **kwargs) -> torch.Tensor:
        """Greedy (by default) generation from spliced embeddings; rows must be LEFT-padded. Returns only the new
        token ids [N, <= max_new_tokens] (transformers drops the prompt when generating from inputs_embeds)."""
        if attention_mask.shape[1] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs left-padded prompts (tokenizer.padding_side = 'left')")
        embeds = self.splice(input_ids, media)
        kwargs.setdefault("do_sample", False)
        tok = self.tokenizer
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)

    # ---------------------------------------------------------------------------------------------- save/load
    def multimodal_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone: projectors, missing embeddings, heads (served next to the merged LM)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save_multimodal(self, directory: str | Path) -> None:
        from llmrec.io import atomic_path, atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / MM_WEIGHTS) as tmp:
            save_file(self.multimodal_state_dict(), str(tmp))
        atomic_write_json(directory / MM_CONFIG, self.cfg.__dict__)

    def load_multimodal(self, directory: str | Path) -> None:
        state = load_file(str(Path(directory) / MM_WEIGHTS))
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("lm.")]
        if missing or unexpected:
            raise ValueError(f"{directory}/{MM_WEIGHTS} does not match the model: missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")


def read_mm_config(directory: str | Path) -> MMConfig:
    return MMConfig(**json.loads((Path(directory) / MM_CONFIG).read_text()))
