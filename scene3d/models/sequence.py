"""Prompt and splicing: the LLM sequences of a batch, with the scene prefix shared by a scene's questions.

Training packs each scene into one row::

    [system <OBJa> <obj_feat> <OBJb> <obj_feat> ... scene end] [question 1 + answer 1] [question 2 + answer 2] ...
     \\______________ prefix: encoded once per scene ________/  \\___ each attends to the prefix and itself ___/

A 4D attention mask lets every token of question ``i`` attend to the prefix and to the earlier tokens of
question ``i`` only, and each question's rotary positions continue from the prefix's end, so each question
computes exactly what it would in a sequence of its own (``tests/test_referring_model.py`` checks it) while
the prefix — system prompt, identifiers, object tokens — runs through the LLM once per scene and the
gradients of all the scene's questions flow into its object tokens. (Chat-Scene encodes the whole prefix
again for every question.) Inference does the same with the prefix in the KV cache
(:mod:`scene3d.models.cache`).

Where the LLM cannot take a 4D mask (attention other than ``sdpa`` / ``eager``, sliding-window layers) or a
query-conditioned gate makes the prefix differ per question, every question gets its own row, prefix
included (:attr:`PackedSequences.shared` is then False).

What the decoder reads from the sequence (:func:`gather_states`): the LLM's last-layer states at each
question's text tokens and at its prompt's last token (or its ``[SEG]``: ``ReferringConfig.sentence_state``); or, for the ablation ``decoder_states="embeddings"``, the
input embeddings at the same positions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from scene3d.constants import IGNORE_INDEX
from scene3d.llm.prompt import ScenePrompt, _tok, build_prompt, text_token_ids


class QueryLayout(NamedTuple):
    """Where a question's own text sits in :func:`scene3d.llm.prompt.build_query`'s ids."""

    word_start: int  # index of the text's first token in the query ids
    num_words: int  # tokens of the (possibly cut) text


def query_layout(tokenizer, text: str, config) -> QueryLayout:
    return QueryLayout(len(_tok(tokenizer, config.question_prefix)),
                       len(text_token_ids(tokenizer, text, config.max_text_tokens, warn=False).ids))


class PackedSequences(NamedTuple):
    """LLM inputs of ``B`` questions in ``R`` rows (one per scene when ``shared``, else one per question).

    ``attention_mask`` is ``[R, 1, L, L]`` additive when ``shared`` else ``[R, L]`` (1 at real tokens).
    ``word_cols [B, T]`` / ``word_mask [B, T]`` are the columns of each question's text tokens in row
    ``rows[b]``; ``seg_cols [B]`` the column of its ``[SEG]`` and ``ask_cols [B]`` that of its prompt's last
    token (from which the answer starts); ``prompts[b]`` its own prompt (prefix + its
    question + answer, as :func:`build_prompt` makes it). ``obj_cols [R, P]`` are the columns of each row's
    object tokens and ``obj_slots [R, P]`` their identifiers (-1: padding), for the identifier pointer
    (:mod:`scene3d.models.pointer`).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    word_cols: torch.Tensor
    word_mask: torch.Tensor
    seg_cols: torch.Tensor
    prompts: list
    shared: bool
    obj_cols: torch.Tensor
    obj_slots: torch.Tensor
    ask_cols: torch.Tensor


def pack(tokenizer, vocab, config, groups: Sequence, embed_prompt, embed_ids, shared: bool) -> PackedSequences:
    """``groups``: per row, ``(scene_row, num_objects, keep [M'], seed, [(text, local target rows), ...], names)``
    (``names``: the class names written into the prefix, one per object, or None);
    ``embed_prompt(scene_row, prompt) -> [L, H]`` splices the object tokens into a prompt's embeddings (once per
    row: the prefix is the same for the row's questions); ``embed_ids(ids [T]) -> [T, H]`` embeds the rest of
    each question (no placeholders there)."""
    rows_x, rows_lab, rows_own, rows_pos, prompts, rows_of, words, segs, asks = [], [], [], [], [], [], [], [], []
    obj_cols, obj_slots = [], []
    for r, (scene_row, num_objects, keep, seed, questions, names) in enumerate(groups):
        if not shared and len(questions) != 1:
            raise ValueError("without a shared prefix every row holds one question")
        xs, labs, own, pos = [], [], [], []
        for i, (text, targets) in enumerate(questions):
            p: ScenePrompt = build_prompt(tokenizer, vocab, num_objects, text, targets, seed=seed, keep=keep,
                                          config=config, names=names)
            prompts.append(p)
            lp, n = p.prefix_len, p.input_ids.numel() - p.prefix_len  # prefix, this question + answer
            lay = query_layout(tokenizer, text, config)
            if i == 0:  # the prefix, once per row
                emb = embed_prompt(scene_row, p)  # (L, H): prefix + question + answer
                obj_cols.append(p.placeholder_pos)
                obj_slots.append(p.slot_of_object[p.placeholder_obj])
                xs.append(emb[:lp]); labs.append(p.labels[:lp]); own.append(torch.full((lp,), -1))
                pos.append(torch.arange(lp))
                start = lp  # column of the next question's first token
                xs.append(emb[lp:])
            else:
                xs.append(embed_ids(p.input_ids[lp:]))
            labs.append(p.labels[lp:]); own.append(torch.full((n,), i))
            pos.append(lp + torch.arange(n))
            words.append(start + lay.word_start + torch.arange(lay.num_words))
            segs.append(start + p.seg_pos - lp if p.seg_pos >= 0 else -1)
            asks.append(start + p.answer_start - 1 - lp)
            start += n
            rows_of.append(r)
        rows_x.append(torch.cat(xs)); rows_lab.append(torch.cat(labs)); rows_own.append(torch.cat(own))
        rows_pos.append(torch.cat(pos))
    dev, dtype = rows_x[0].device, rows_x[0].dtype
    lens = [x.shape[0] for x in rows_x]
    n, lmax = len(rows_x), max(lens)
    x = torch.nn.utils.rnn.pad_sequence(rows_x, batch_first=True)  # (R, L, H), zeros behind each row
    labels = torch.full((n, lmax), IGNORE_INDEX, dtype=torch.long)
    position = torch.zeros(n, lmax, dtype=torch.long)
    owner = torch.full((n, lmax), -2, dtype=torch.long)  # -2: padding
    for r in range(n):
        labels[r, : lens[r]] = rows_lab[r]
        position[r, : lens[r]] = rows_pos[r]
        owner[r, : lens[r]] = rows_own[r]
    if shared:
        col = torch.arange(lmax)
        causal = col[None, :] <= col[:, None]  # (L, L): key <= query
        same = (owner[:, None, :] == owner[:, :, None]) | (owner[:, None, :] == -1)  # (R, Lq, Lk)
        allowed = causal[None] & same & (owner[:, None, :] >= -1)
        allowed |= torch.eye(lmax, dtype=torch.bool)[None] & (owner[:, :, None] == -2)  # padding sees itself
        mask = torch.zeros(n, 1, lmax, lmax, dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)  # additive: exp(min - max) is exactly 0
    else:
        mask = (owner >= -1).long()
    t = max(w.numel() for w in words)
    word_cols = torch.zeros(len(words), t, dtype=torch.long)
    word_mask = torch.zeros(len(words), t, dtype=torch.bool)
    for b, w in enumerate(words):
        word_cols[b, : w.numel()] = w
        word_mask[b, : w.numel()] = True
    cols, slots = pad_objects(obj_cols, obj_slots)
    return PackedSequences(x, mask.to(dev), position.to(dev), labels.to(dev), torch.tensor(rows_of, device=dev),
                           word_cols.to(dev), word_mask.to(dev), torch.tensor(segs, device=dev), prompts, shared,
                           cols.to(dev), slots.to(dev), torch.tensor(asks, device=dev))


def pad_objects(cols: Sequence[torch.Tensor], slots: Sequence[torch.Tensor]):
    """Per-row object-token columns and identifiers padded to ``[R, P]`` (columns 0, identifiers -1)."""
    p = max((c.numel() for c in cols), default=0)
    out_c = torch.zeros(len(cols), p, dtype=torch.long)
    out_s = torch.full((len(cols), p), -1, dtype=torch.long)
    for r, (c, s) in enumerate(zip(cols, slots)):
        out_c[r, : c.numel()] = c
        out_s[r, : s.numel()] = s
    return out_c, out_s


def gather_states(hidden: torch.Tensor, rows: torch.Tensor, word_cols: torch.Tensor, word_mask: torch.Tensor,
                  seg_cols: Optional[torch.Tensor]):
    """``(words [B, T, H], seg [B, H] or None)`` from ``hidden [R, L, H]`` (LLM states or input embeddings)."""
    words = hidden[rows[:, None], word_cols] * word_mask[..., None].to(hidden.dtype)
    seg = None if seg_cols is None else hidden[rows, seg_cols]
    return words, seg
