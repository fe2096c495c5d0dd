"""Song embeddings from cached backbone states, and stage 2b: the embedding heads refitted on every training song.

Stage 2 trains LoRA, projectors and heads together, but each step embeds only `batch_size` songs: 100 steps of 4 show
the heads at most ~400 of a catalogue's thousands of songs with plays, while the no-LLM bar (`mm2cf`, a ridge map)
is fitted on every one of them. After stage 2 the backbone is fixed and its `<emb>` state for every song is computed
once anyway, for the export. The heads — `EmbeddingHead` (LM state + late-fused audio/cover/sentence branches) and
`IDMappingHead` — are small, so on those cached states they can be fitted on every training song for many epochs in
seconds, with stage 2's two losses: song -> CF factor against the whole factor table, and song <-> co-listened song.
The LoRA weights and projectors are not touched, so generation (the reasons) is unchanged.

A tenth of the training songs is held out to choose the epoch (early stopping, best held-out loss): the heads must
carry over to songs without plays, which they never see. `train.head_refit_epochs: 0` turns the stage off.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmrec.model.collate import MultimodalCollator, embedding_rows
from llmrec.model.heads import EmbeddingHead, IDMappingHead
from llmrec.model.losses import catalog_info_nce, info_nce
from llmrec.model.mm_lm import MultimodalLM

NO_LM = "no-lm"  # the embeddings variant of the heads refitted without the LM state (`without_lm_state`)
HELD_OUT_SHARE = 0.1
MIN_HELD_OUT = 8  # fewer held-out songs than this make a noisy stopping rule: train the full epochs instead
MAX_HELD_OUT = 4096  # enough for a stable stopping rule; more only costs time every epoch on a big catalogue
# Training steps on a catalogue with more songs than this take this many random table rows as negatives (sampled
# softmax) instead of all of them: at 85k songs the whole table made each step a [256, 85k] product. The held-out
# loss always uses the whole table.
MAX_TABLE_NEGATIVES = 16384
PATIENCE = 5  # epochs without a better held-out loss before stopping


@dataclass
class HeadInputs:
    """What the embedding head reads, one row per song: the backbone's `<emb>` state [N, H] and the late-fusion
    branch inputs (`MultimodalLM.head_branch_inputs`; None where the model has no such branch)."""

    song_ids: list[str]
    hidden: torch.Tensor
    audio: torch.Tensor | None
    cover: torch.Tensor | None
    text: torch.Tensor | None

    def embeddings(self, model: MultimodalLM, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Unit song embeddings of `rows`, exactly as `MultimodalLM.head` computes them, on the heads' device (the
        cached inputs stay in host memory: 4096-d states of a million songs are 16 GB)."""
        device = next(model.embed_head.parameters()).device
        branches = (None if x is None else x[rows].to(device) for x in (self.audio, self.cover, self.text))
        return model.embed_head(self.hidden[rows].to(device), *branches)


@torch.no_grad()
def head_inputs(model: MultimodalLM, collate: MultimodalCollator, prompts: dict[str, str], batch_size: int = 32,
                drop: tuple[str, ...] = (), progress: bool = False) -> HeadInputs:
    """The head's inputs for every song in `prompts` (one backbone pass each); modalities named in `drop` are shown
    as missing. `progress`: a bar with an ETA (SmolLM2 embeds about 5-15 songs/s on 2 CPU cores)."""
    model.eval()
    ids = list(prompts)
    parts: list[tuple] = []
    desc = "song embeddings" + (f" without {'+'.join(drop)}" if drop else "")
    bar = tqdm(total=len(ids), desc=desc, unit="song", disable=not progress)
    for i in range(0, len(ids), batch_size):
        chunk = ids[i: i + batch_size]
        batch = collate(embedding_rows(prompts, chunk))
        media = batch["media"]
        if "audio" in drop:
            media.audio_present = torch.zeros_like(media.audio_present)
        if "cover" in drop:
            media.cover_present = torch.zeros_like(media.cover_present)
        pooled = model.embed_token_states(batch["input_ids"], batch["attention_mask"], media)
        branches = model.head_branch_inputs(len(chunk), media)
        parts.append(tuple(None if x is None else x.float().cpu() for x in (pooled, *branches)))
        bar.update(len(chunk))
    bar.close()
    columns = list(zip(*parts)) if parts else [[] for _ in range(4)]
    cat = [None if not col or col[0] is None else torch.cat(col) for col in columns]
    if cat[0] is None:
        cat[0] = torch.zeros(0, model.embed_head.text.in_features)
    return HeadInputs(ids, *cat)


@dataclass
class _RefitData:
    """Rows of `HeadInputs` that have a CF factor (`table` row k = song row `rows[k]`), and co-listen row pairs."""

    rows: torch.Tensor
    table: torch.Tensor
    positives: torch.Tensor  # [P, 2] pairs of indices into `rows`


def _refit_data(inputs: HeadInputs, pairs: list[dict]) -> _RefitData:
    row_of = {sid: k for k, sid in enumerate(inputs.song_ids)}
    factors: dict[str, list[float]] = {}
    for r in pairs:  # pairs repeat a song once per co-listened partner; its CF factor is the same in each
        if r["song_id"] in row_of:
            factors.setdefault(r["song_id"], r["cf_factor"])
    k_of = {sid: k for k, sid in enumerate(factors)}
    positives = sorted({(k_of[r["song_id"]], k_of[r["pos_song_id"]]) for r in pairs
                        if r["song_id"] in k_of and r.get("pos_song_id") in k_of})
    return _RefitData(rows=torch.tensor([row_of[s] for s in factors], dtype=torch.long),
                      table=torch.tensor(list(factors.values()), dtype=torch.float32),
                      positives=torch.tensor(positives, dtype=torch.long).reshape(-1, 2))


def _loss(model: MultimodalLM, inputs: HeadInputs, data: _RefitData, songs: torch.Tensor, colisten_weight: float,
          temperature: float, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2's song losses over the songs `songs` (indices into `data.rows`): each song's mapped embedding against
    the CF table, plus InfoNCE between co-listened songs when both are in `songs`. `negatives`: table rows to use
    instead of the whole table (sampled softmax, for big catalogues); the batch's own rows are always in."""
    emb = inputs.embeddings(model, data.rows[songs])
    device = emb.device
    if negatives is None:
        table, targets = data.table, songs
    else:
        negatives = negatives[~torch.isin(negatives, songs)]
        table, targets = data.table[torch.cat([songs, negatives])], torch.arange(len(songs))
    loss = catalog_info_nce(model.id_head(emb), table.to(device), targets.to(device), temperature)
    if colisten_weight and len(data.positives):
        where = torch.full((len(data.rows),), -1, dtype=torch.long)
        where[songs] = torch.arange(len(songs))
        pos = where[data.positives]
        pos = pos[(pos >= 0).all(1)]
        if len(pos) >= 2:  # InfoNCE needs another pair as a negative
            pos = pos.to(device)
            loss = loss + colisten_weight * info_nce(emb[pos[:, 0]], emb[pos[:, 1]], temperature)
    return loss


@dataclass
class Heads:
    """The two heads stage 2b fits, apart from a model (anything with these two attributes can be refitted)."""

    embed_head: EmbeddingHead
    id_head: IDMappingHead
    lm_branch: bool = True  # False: the LM-state branch (`embed_head.text`) is zero and is not trained


def without_lm_state(model: MultimodalLM | Heads) -> Heads:
    """A copy of the model's heads whose LM-state branch is removed (zero, frozen): only the late-fused raw features
    (audio, cover, sentence) reach the embedding. Refitted like the real heads, on the same songs and losses, it is
    the strongest no-LLM counterpart of llmrec's embedding: same head, same training, no LLM (`llmrec-no-lm`)."""
    heads = Heads(copy.deepcopy(model.embed_head), copy.deepcopy(model.id_head), lm_branch=False)
    with torch.no_grad():
        for p in heads.embed_head.text.parameters():
            p.zero_()
    heads.embed_head.text.requires_grad_(False)
    return heads


def refit_heads(model: MultimodalLM | Heads, inputs: HeadInputs, pairs: list[dict], epochs: int, lr: float,
                batch_size: int, colisten_weight: float, temperature: float, seed: int,
                progress: bool = False) -> dict:
    """Fit `model.embed_head` and `model.id_head` on the training songs' cached inputs (see the module docstring);
    the best epoch's weights (lowest held-out loss) are left in the model; a removed LM branch (`Heads.lm_branch`
    False) stays zero. Returns what happened, for the train summary: songs, epochs run, best epoch, held-out loss
    before and after."""
    data = _refit_data(inputs, pairs)
    n = len(data.rows)
    if n < 2:
        return {"skipped": f"{n} training song(s) with a CF factor: nothing to refit the heads on"}
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_held = min(int(n * HELD_OUT_SHARE), MAX_HELD_OUT)
    held, fit_songs = (order[:n_held], order[n_held:]) if n_held >= MIN_HELD_OUT else (order[:0], order)
    heads = [model.embed_head, model.id_head]
    frozen = set() if getattr(model, "lm_branch", True) else {id(p) for p in model.embed_head.text.parameters()}
    params = [p for h in heads for p in h.parameters() if id(p) not in frozen]
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def held_out_loss() -> float | None:
        """Mean loss over the held-out songs in chunks of `batch_size` (so that a big catalogue's [songs, table]
        logits are never built whole), each chunk weighted by its size."""
        if not len(held):
            return None
        with torch.no_grad():
            total = sum(float(_loss(model, inputs, data, held[i: i + batch_size], colisten_weight, temperature))
                        * len(held[i: i + batch_size]) for i in range(0, len(held), batch_size))
        return total / len(held)

    def snapshot() -> list[dict]:
        return [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads]

    before = best = held_out_loss()
    best_state, best_epoch, ran, stale = snapshot(), 0, 0, 0
    bar = tqdm(range(1, epochs + 1), desc="stage 2b (heads on every training song)", unit="epoch",
               disable=not progress)
    for h in heads:
        h.train()
    for epoch in bar:
        ran = epoch
        perm = fit_songs[torch.randperm(len(fit_songs), generator=gen)]
        for i in range(0, len(perm), batch_size):
            songs = perm[i: i + batch_size]
            if len(songs) < 2:
                continue
            negatives = (torch.randperm(n, generator=gen)[:MAX_TABLE_NEGATIVES] if n > MAX_TABLE_NEGATIVES
                         else None)
            loss = _loss(model, inputs, data, songs, colisten_weight, temperature, negatives)
            opt.zero_grad()
            loss.backward()
            opt.step()
        current = held_out_loss()
        if current is None:
            best_state, best_epoch = snapshot(), epoch
            continue
        bar.set_postfix(held_out=f"{current:.3f}")
        if current < best:
            best, best_state, best_epoch, stale = current, snapshot(), epoch, 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    bar.close()
    for h, state in zip(heads, best_state):
        h.load_state_dict(state)
        h.eval()
    for p, trainable in zip(params, was_trainable):
        p.requires_grad_(trainable)
    report = {"songs": n, "held_out_songs": int(len(held)), "co_listen_pairs": int(len(data.positives)),
              "epochs_run": ran, "best_epoch": best_epoch}
    if before is not None:
        report["held_out_loss"] = [round(before, 4), round(best, 4)]
    return report

