"""Generation and reconciliation: greedy answers for a scene's questions, then one result per question.

The questions of one scene are answered as a batch, one LLM call per greedy step for all of them. Three ways
to start (each returns the decoding state and the decoder's inputs read off the same sequences):

* :func:`start_packed` — the scene prefix in the KV cache (:class:`scene3d.models.cache.SceneCache`) and the
  questions packed one after the other behind one copy of it (4D mask; ``sdpa`` / ``eager`` attention);
* :func:`start_cached_rows` — the cache copied into one row per question (any model);
* :func:`start_uncached` — every question's whole prompt encoded (a gate, or ``use_cache=False``).

All three compute the same numbers in fp32 (``tests/test_scene_cache.py``). :func:`greedy` decodes;
:func:`reconcile` turns an answer and the decoder's output into a :class:`Prediction`.

Reconciliation (``ReferringConfig.reconcile``): ``"identifiers"`` (default) takes the objects whose
identifiers the answer names (identifiers map back to objects exactly) and falls back to the decoder's
objects (:func:`decoder_objects`) when it names none; ``"decoder"`` asks the decoder first (its "none" is
final when it has a "no target" logit). The reconciled point mask is the union of the chosen objects' points;
the raw decoder mask and the identifier mask are returned beside it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from scene3d.llm.prompt import build_prompt, parse_answer
from scene3d.models.sequence import gather_states, pad_objects, query_layout


class Prediction(NamedTuple):
    """One query's result on one scene (local object indices; masks over the scene's ``N`` points)."""

    point_mask: torch.Tensor  # [N] bool, reconciled
    objects: torch.Tensor  # [T] long, reconciled local object indices (may be empty)
    object_ids: torch.Tensor  # [T] long, their source ids (-1 where unknown)
    decoder_mask: torch.Tensor  # [N] bool
    identifier_mask: torch.Tensor  # [N] bool
    obj_scores: torch.Tensor  # [M] float, sigmoid of the decoder's object logits
    answer_ids: list  # generated token ids (ends with [SEG])
    identifiers: list  # identifiers named in the answer
    source: str  # "identifiers", "decoder" or "none"
    #: [L] long, local rows of the objects left out of the LLM prompt (more objects than identifiers,
    #: ``overflow="topk"``): the answer cannot name them; the decoder still scores them
    left_out: Optional[torch.Tensor] = None
    #: the share of orientations that gave this answer when the scan was answered in several quarter turns
    #: (:mod:`scene3d.models.turns`); 1.0 otherwise
    agreement: float = 1.0


class PointerKeys(NamedTuple):
    """What the identifier pointer needs for ``B`` questions (:mod:`scene3d.models.pointer`)."""

    hidden: torch.Tensor  # [B, H] state after each question's last token (the first answer logits)
    states: torch.Tensor  # [B, P, H] the LLM's states at the object tokens of each question's prompt
    slots: torch.Tensor  # [B, P] their identifiers (-1: padding)


class Started(NamedTuple):
    steps: object  # _RowSteps or _PackedSteps
    words: torch.Tensor  # [B, T, H] the decoder's word states (LLM states, or input embeddings: ablation)
    word_mask: torch.Tensor  # [B, T]
    slots: list  # per question, the identifier of each object [M]
    pointer: PointerKeys


def _word_cols(model, texts, starts) -> tuple:
    lays = [query_layout(model.text_tokenizer, t, model.config.prompt) for t in texts]
    t = max(lay.num_words for lay in lays)
    cols = torch.zeros(len(texts), t, dtype=torch.long)
    mask = torch.zeros(len(texts), t, dtype=torch.bool)
    for i, (lay, s) in enumerate(zip(lays, starts)):
        cols[i, : lay.num_words] = int(s) + lay.word_start + torch.arange(lay.num_words)
        mask[i, : lay.num_words] = True
    return cols, mask


def _pick(model, hidden, embeds, rows, cols, mask):
    source = hidden if model.config.decoder_states == "llm" else embeds
    dev = source.device
    return gather_states(source, rows.to(dev), cols.to(dev), mask.to(dev), None)[0], mask.to(dev)


def start_packed(model, scene_cache, texts: Sequence[str]) -> Started:
    """The rest of ``B`` questions (after the cached scene prefix and question head), packed one after the
    other behind one copy of the cache; each attends to the cache and to its own earlier tokens only."""
    dev = scene_cache.last_logits.device
    tails = [scene_cache.query_tail(t) for t in texts]
    lens = torch.tensor([q.numel() for q in tails], device=dev)  # (B,)
    b, lc = len(tails), scene_cache.cached_len
    owner = torch.repeat_interleave(torch.arange(b, device=dev), lens)  # (T,) question of each token
    ends = torch.cumsum(lens, 0)  # (B,)
    pos = lc + torch.arange(owner.numel(), device=dev) - (ends - lens)[owner]  # (T,) rotary positions
    steps = _PackedSteps(model.lm, scene_cache.fork(), torch.full((lc,), -1, dtype=torch.long, device=dev), lc + lens)
    ids = torch.cat(tails).to(dev)
    out = steps.run(ids, owner, pos, logits_at=ends - 1)
    steps.logits = out.logits[0]  # (B, V)
    head = scene_cache.head_ids.numel()  # the tails start after the question head
    cols, mask = _word_cols(model, texts, (ends - lens - head).tolist())
    embeds = model.lm.embed(ids[None]) if model.config.decoder_states == "embeddings" else None  # ablation only
    words, mask = _pick(model, out.hidden, embeds, torch.zeros(b, dtype=torch.long), cols, mask)
    return Started(steps, words, mask, [scene_cache.slot_of_object] * b,
                   _cached_keys(scene_cache, out.hidden[0, ends - 1]))


def _cached_keys(scene_cache, hidden: torch.Tensor) -> PointerKeys:
    b = hidden.shape[0]
    return PointerKeys(hidden, scene_cache.obj_states[None].expand(b, -1, -1),
                       scene_cache.obj_slots[None].expand(b, -1).to(hidden.device))


def start_cached_rows(model, scene_cache, texts: Sequence[str]) -> Started:
    """As :func:`start_packed` with one row per question (the cache copied into every row)."""
    dev = scene_cache.last_logits.device
    tails = [scene_cache.query_tail(t) for t in texts]
    lens = torch.tensor([q.numel() for q in tails], device=dev)  # (B,)
    b, lt, lc = len(tails), int(lens.max()), scene_cache.cached_len
    ids = torch.full((b, lt), model.vocab.seg_token_id, dtype=torch.long)  # padding: any valid id, masked
    for i, q in enumerate(tails):
        ids[i, : q.numel()] = q
    total = lc + lt + model.config.max_new_tokens + 1  # room for the answer and a forced [SEG]
    attn = torch.zeros(b, total, dtype=torch.long, device=dev)  # (B, S): 1 at real tokens
    attn[:, :lc] = 1
    attn[:, lc : lc + lt] = (torch.arange(lt, device=dev) < lens[:, None]).long()
    pos = (lc + torch.arange(lt, device=dev)).expand(b, lt)
    x = model.lm.embed(ids.to(dev))
    out = model.lm(x, attention_mask=attn, cache=scene_cache.expand(b, total), use_cache=True, position_ids=pos,
                   logits_at=lens - 1)
    steps = _RowSteps(model.lm, out.logits[:, 0], out.cache, attn, lc + lens, lc + lt, model.vocab.seg_token_id)
    cols, mask = _word_cols(model, texts, [-scene_cache.head_ids.numel()] * b)
    words, mask = _pick(model, out.hidden, x, torch.arange(b), cols, mask)
    return Started(steps, words, mask, [scene_cache.slot_of_object] * b,
                   _cached_keys(scene_cache, out.hidden[torch.arange(b, device=dev), lens - 1]))


def start_uncached(model, scene, texts: Sequence[str]) -> Started:
    """Whole prompts (scene prefix + question) of ``B`` texts encoded as one right-padded batch, each with
    its own identifier assignment ``[M]`` (a gate may keep different objects per text)."""
    embeds, slots, starts, obj_cols, obj_slots = [], [], [], [], []
    for t in texts:
        kept, feat = model.gate_objects(scene, [t])  # the gate sees one scene, so one question at a time
        prompt = build_prompt(model.text_tokenizer, model.vocab, scene.tokens.num_objects, t, None, seed=None,
                              keep=model.keep_objects(scene, 0, kept), config=model.config.prompt,
                              names=model.prompt_names(scene, 0))
        embeds.append(model.embed_prompt(scene, 0, prompt, feat))  # (L_b, H)
        slots.append(prompt.slot_of_object)
        starts.append(prompt.prefix_len)
        obj_cols.append(prompt.placeholder_pos)
        obj_slots.append(prompt.slot_of_object[prompt.placeholder_obj])
    dev = embeds[0].device
    lens = torch.tensor([e.shape[0] for e in embeds], device=dev)  # (B,)
    x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, L, H), zeros behind each row
    b, lx = x.shape[:2]
    total = lx + model.config.max_new_tokens + 1
    attn = torch.zeros(b, total, dtype=torch.long, device=dev)
    attn[:, :lx] = (torch.arange(lx, device=dev) < lens[:, None]).long()
    pos = torch.arange(lx, device=dev).expand(b, lx)
    out = model.lm(x, attention_mask=attn, cache=model.lm.new_cache(total), use_cache=True, position_ids=pos,
                   logits_at=lens - 1)
    steps = _RowSteps(model.lm, out.logits[:, 0], out.cache, attn, lens, lx, model.vocab.seg_token_id)
    cols, mask = _word_cols(model, texts, starts)
    words, mask = _pick(model, out.hidden, x, torch.arange(b), cols, mask)
    oc, os_ = pad_objects(obj_cols, obj_slots)
    r = torch.arange(b, device=dev)
    keys = PointerKeys(out.hidden[r, lens - 1], out.hidden[r[:, None], oc.to(dev)], os_.to(dev))
    return Started(steps, words, mask, slots, keys)


def greedy(model, steps, pointer: Optional[PointerKeys] = None, bias: Optional[torch.Tensor] = None):
    """Greedy decoding of ``B`` questions at once until each has produced ``[SEG]``.

    Per question, as one-at-a-time decoding would: placeholders are never generated; an identifier already
    named in this answer is not named again (an answer lists each target once, as training teaches; without
    the rule a half-trained model repeated one identifier up to ``max_new_tokens``); ``</s>`` ends the
    answer (not kept); after ``max_new_tokens`` tokens without ``[SEG]`` one is appended, so the decoder
    always gets a state. With ``pointer`` the identifier logits get the pointer scores at every step
    (:meth:`ReferringSegmenter.answer_logits`), plus ``bias [B, NI]`` (the grounding head's logits per
    identifier, ``identifier_grounding``) when given. Only unfinished questions are fed (``steps.step``). Returns
    (answer ids per question, hidden state ``[B, H]`` at each question's ``[SEG]``).
    """
    vocab, max_new = model.vocab, model.config.max_new_tokens
    seg, eos = vocab.seg_token_id, model.text_tokenizer.eos_token_id
    logits = steps.logits  # (A, V) of the active questions
    b = logits.shape[0]
    active = torch.arange(b, device=logits.device)
    if pointer is not None:
        logits = model.answer_logits(logits, pointer.hidden, pointer.states, pointer.slots, bias)
    answers: list = [[] for _ in range(b)]
    seg_hidden = None
    ident = model.identifier_ids.to(logits.device)  # (NI,)
    named = torch.zeros(b, ident.numel(), dtype=torch.bool, device=logits.device)  # identifiers said so far
    for step in range(max_new + 1):
        logits[:, vocab.placeholder_id] = float("-inf")  # placeholders are never generated
        logits[:, ident] = logits[:, ident].masked_fill(named[active], float("-inf"))
        nxt = logits.argmax(-1)  # (A,)
        if eos is not None:
            nxt = torch.where(nxt == eos, seg, nxt)
        if step == max_new:
            nxt = torch.full_like(nxt, seg)
        for i, t in zip(active.tolist(), nxt.tolist()):
            answers[i].append(t)
        named[active] |= ident[None] == nxt[:, None]
        logits, hidden = steps.step(active, nxt)  # (A, V), (A, H)
        if pointer is not None:
            logits = model.answer_logits(logits, hidden, pointer.states[active], pointer.slots[active],
                                         None if bias is None else bias[active])
        if seg_hidden is None:
            seg_hidden = hidden.new_zeros(b, hidden.shape[-1])
        now = nxt == seg
        seg_hidden[active[now]] = hidden[now]
        active, logits = active[~now], logits[~now]
        if not active.numel():
            break
    return answers, seg_hidden


def decoder_objects(obj_logits: torch.Tensor, null_logit: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
    """The local object rows the decoder picks, sorted: those scored ``>= threshold``; with a "no target"
    logit, nothing when it beats every object, else the best object plus those over the threshold (a
    question has a target exactly when the null loses the softmax, so a single target needs no fixed
    threshold: on a checkpoint trained without the null, held-out single-target rows scored mIoU 0.87 when
    the best object was always taken, 0.68 with the 0.5 threshold alone)."""
    chosen = torch.sigmoid(obj_logits) >= threshold
    if null_logit is not None:
        if not obj_logits.numel() or bool(null_logit >= obj_logits.max()):
            return obj_logits.new_zeros(0, dtype=torch.long)
        chosen[obj_logits.argmax()] = True
    return chosen.nonzero().flatten()


def reconcile(model, scene, answer: list, slot_of_object: torch.Tensor, dec) -> Prediction:
    t = scene.tokens
    c = model.config
    parsed = parse_answer(answer, model.vocab, slot_of_object)
    scores = torch.sigmoid(dec.obj_logits)
    decoder_mask = torch.sigmoid(dec.point_logits) >= c.threshold
    named = torch.tensor(sorted(parsed.objects), dtype=torch.long, device=t.feat.device)
    identifier_mask = torch.isin(t.point2obj, named)
    scored = decoder_objects(dec.obj_logits, dec.null_logits, c.threshold)
    if c.reconcile == "decoder" and dec.null_logits is not None:
        # a decoder with a "no target" logit decides: none is an answer, not a reason to fall back
        objects, source = scored, ("decoder" if scored.numel() else "none")
    else:
        order = [(named, "identifiers"), (scored, "decoder")]
        if c.reconcile == "decoder":
            order.reverse()
        objects, source = next(((o, src) for o, src in order if o.numel()), (scored, "none"))
    point_mask = torch.isin(t.point2obj, objects)
    ids = t.object_ids[objects] if t.object_ids is not None else torch.full_like(objects, -1)
    return Prediction(point_mask, objects, ids, decoder_mask, identifier_mask, scores, answer,
                      parsed.identifiers, source, (slot_of_object < 0).nonzero().flatten())


# ---------------------------------------------------------------------------------------------- decoding steps
class _RowSteps:
    """Decoding state with one row per question in a preallocated cache (:meth:`IdentifierLM.new_cache`).

    ``logits [B, V]`` after each row's last real token; ``attn [B, S]`` 1 at real tokens, 0 at padding and
    at columns not yet written; ``pos [B]`` rotary position of each row's next token; ``col`` the cache column
    the next tokens go to (same for all rows). A finished row is fed a dummy token and its outputs dropped
    (rows never see each other, so it cannot disturb the others).
    """

    def __init__(self, lm, logits, cache, attn, pos, col: int, dummy: int) -> None:
        self.lm, self.logits, self.cache, self.attn = lm, logits, cache, attn
        self.pos, self.col, self.dummy = pos, col, dummy

    def step(self, active: torch.Tensor, tokens: torch.Tensor):
        """Feed ``tokens [A]`` to rows ``active [A]``; returns their next logits ``[A, V]``, hidden ``[A, H]``."""
        b = self.attn.shape[0]
        feed = torch.full((b,), self.dummy, dtype=torch.long, device=tokens.device)
        feed[active] = tokens
        self.attn[:, self.col] = 1  # a finished row attends only to itself; its outputs are dropped
        out = self.lm(self.lm.embed(feed[:, None]), attention_mask=self.attn, cache=self.cache, use_cache=True,
                      position_ids=self.pos[:, None], logits_at=torch.zeros_like(self.pos))
        self.cache, self.pos, self.col = out.cache, self.pos + 1, self.col + 1
        return out.logits[active, 0], out.hidden[active, 0]


class _PackedSteps:
    """Decoding state with all questions of a batch in one sequence behind one copy of the shared prefix.

    The cache holds the shared prefix (``owner == -1``, seen by every question) followed by the questions'
    tokens in the order they were fed; ``owner [K]`` names the question of each cached token, ``next_pos [B]``
    the rotary position of each question's next token. A token attends to the shared prefix and to the
    earlier tokens of its own question (4D additive mask), so each question computes what it would alone.
    """

    def __init__(self, lm, cache, owner: torch.Tensor, next_pos: torch.Tensor) -> None:
        self.lm, self.cache, self.owner, self.next_pos = lm, cache, owner, next_pos
        self.logits: Optional[torch.Tensor] = None

    def run(self, ids: torch.Tensor, owner: torch.Tensor, pos: torch.Tensor,
            logits_at: Optional[torch.Tensor] = None):
        """Append tokens ``ids [T]`` of questions ``owner [T]`` at rotary positions ``pos [T]``; ``logits_at
        [K]`` picks the positions (of the ``T``) whose logits are computed (default all)."""
        k0 = self.owner.numel()
        k_owner = torch.cat([self.owner, owner])  # (K,)
        q_col = k0 + torch.arange(owner.numel(), device=owner.device)  # (T,) cache column of each new token
        k_col = torch.arange(k_owner.numel(), device=owner.device)
        own = (k_owner[None] == owner[:, None]) & (k_col[None] <= q_col[:, None])  # (T, K) own earlier tokens
        allowed = (k_owner[None] < 0) | own
        x = self.lm.embed(ids[None])  # (1, T, H)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)  # additive: exp(min - max) is exactly 0
        out = self.lm(x, attention_mask=mask[None, None], cache=self.cache, use_cache=True, position_ids=pos[None],
                      logits_at=None if logits_at is None else logits_at[None])
        self.cache, self.owner = out.cache, k_owner
        return out

    def step(self, active: torch.Tensor, tokens: torch.Tensor):
        """Feed ``tokens [A]`` to questions ``active [A]``; returns their next logits ``[A, V]``, hidden ``[A, H]``."""
        out = self.run(tokens, active, self.next_pos[active])
        self.next_pos = self.next_pos.index_add(0, active, torch.ones_like(active))
        return out.logits[0], out.hidden[0]
