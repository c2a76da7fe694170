"""Prompts with object identifiers: build, parse, and map identifiers back to objects.

Token layout of one sample (each piece tokenized on its own and concatenated, so the scene prefix has the
same ids whatever question follows — the scene cache relies on it)::

    [system ...] <OBJs0> <obj_feat> <OBJs1> <obj_feat> ... [scene end] | [question ...] [answer prefix] [SEG] | <OBJa> <OBJb> [SEG]
    \\______________________ prefix (cacheable) __________________/     \\___ query ______________/     \\___ answer ____/

* Identifier ``k`` is written ``<OBJ{k:03d}>``; each placeholder ``<obj_feat>`` is later replaced by the object
  token of the object holding that identifier (labels there are ``IGNORE_INDEX``).
* With object names (``names``: ``ReferringConfig.object_labels``) each object's class name is written between
  its identifier and its token, ``<OBJ003> chair <obj_feat>``, so the state at the object token has read the
  name (the identifier pointer and the answer match the question's words against it).
* Identifier assignment: ``slot_of_object[j]`` is the identifier of object ``j``. In training it is a seeded
  random choice of distinct identifiers out of ``K`` (Chat-3D v2 / Chat-Scene shuffle: the identifier carries
  no class or order prior and every identifier gets trained); at evaluation it is the identity. The prefix
  lists identifiers in increasing order, so the text is sorted and only which object sits behind which
  identifier changes.
* The answer names the targets' identifiers in increasing order and always ends with ``[SEG]``; zero
  targets answer ``none [SEG]``. The query may end with a ``[SEG]`` of its own (``PromptConfig.query_token``,
  set by the referring segmenter): the state the decoder reads and the answer starts from.
* More objects than ``K``: :func:`keep_largest_objects` raises, or keeps the ``K`` with the highest priority
  (documented top-K rule; the model passes point counts).

Only the answer carries labels; the prompt, identifiers and placeholders of the prefix are ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from scene3d.constants import IGNORE_INDEX


@dataclass
class PromptConfig:
    """Texts around the scene and the question (tokenized with the model's tokenizer).

    With ``chat_template`` (the default) and a tokenizer that has one (pretrained instruct models), the
    pieces come from the model's own chat template (:func:`resolve_prompt`): a system turn with
    ``chat_system``, a user turn holding the scene and then ``chat_question`` + the referring text, and the
    template's generation prompt before the answer. Without one (the tiny word-level model) the plain
    ``system`` / ``scene_end`` / ``question_prefix`` / ``answer_prefix`` texts are used as they are.
    """

    system: str = "system : you are given a 3d scene with objects :"
    scene_end: str = "."
    question_prefix: str = "user : find all objects referred by the description :"
    answer_prefix: str = "assistant :"
    none_answer: str = "none"
    #: the referring text is cut to its first ``max_text_tokens`` tokens (of the model's tokenizer), with a
    #: :class:`TextTruncatedWarning`, the same way in training, evaluation and the API (every path tokenizes
    #: the text through :func:`text_token_ids`).
    max_text_tokens: int = 128
    chat_template: bool = True
    chat_system: str = ("You are given a 3D scene. Each object is written as its identifier followed by its "
                        "features. Answer with the identifiers of the objects a description refers to, or none.")
    chat_question: str = "Find all objects referred to by this description:"
    #: a token appended after the answer prefix, so it ends every prompt ("" = none). The referring segmenter
    #: puts ``[SEG]`` there (``ReferringConfig.sentence_state="question"``): the decoder reads its state, which
    #: has read the scene and the question but not the answer, and the answer is generated from it
    query_token: str = ""


#: Markers that cut a rendered chat template into the prompt's pieces (never sent to a model).
_SCENE_MARK, _TEXT_MARK = "\x00SCENE\x00", "\x00TEXT\x00"


def resolve_prompt(config: PromptConfig, tokenizer) -> PromptConfig:
    """The literal pieces for ``tokenizer``: from its chat template when ``config.chat_template`` and it has
    one, else ``config`` unchanged. The template is rendered once with markers where the scene and the text
    go, then cut there, so the pieces concatenate to exactly what the template renders::

        system  = <template up to the scene>      (system turn + the start of the user turn)
        scene_end = <between the scene and the text> (end of the scene + chat_question)
        answer_prefix = <after the text>          (end of the user turn + the assistant's generation prompt)
    """
    template = getattr(tokenizer, "chat_template", None)
    if not config.chat_template or not template:
        return config
    messages = [{"role": "system", "content": config.chat_system},
                {"role": "user", "content": f"{_SCENE_MARK}\n{config.chat_question} {_TEXT_MARK}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or text.count(_SCENE_MARK) != 1 or text.count(_TEXT_MARK) != 1:
        raise ValueError("the tokenizer's chat template does not render the user turn verbatim; "
                         "set prompt.chat_template=false")
    head, rest = text.split(_SCENE_MARK)
    middle, tail = rest.split(_TEXT_MARK)
    return PromptConfig(system=head, scene_end=middle, question_prefix="", answer_prefix=tail,
                        none_answer=config.none_answer, max_text_tokens=config.max_text_tokens,
                        chat_template=False, chat_system=config.chat_system, chat_question=config.chat_question,
                        query_token=config.query_token)


class TextTruncatedWarning(UserWarning):
    """A referring text longer than ``PromptConfig.max_text_tokens`` was cut to its first tokens."""


class TextIds(NamedTuple):
    ids: list  # token ids of the text, at most max_tokens
    dropped: int  # tokens cut from the end (0: the whole text)


def text_token_ids(tokenizer, text: str, max_tokens: int, warn: bool = True) -> TextIds:
    """Token ids of a referring text, cut to the first ``max_tokens`` (the documented rule; see
    :class:`PromptConfig`); a cut is warned about (:class:`TextTruncatedWarning`) unless ``warn=False``."""
    ids = _tok(tokenizer, text)
    if len(ids) <= max_tokens:
        return TextIds(ids, 0)
    if warn:
        import warnings

        warnings.warn(f"referring text of {len(ids)} tokens cut to its first {max_tokens} "
                      f"(prompt.max_text_tokens): {text[:60]!r}...", TextTruncatedWarning, stacklevel=3)
    return TextIds(ids[:max_tokens], len(ids) - max_tokens)


@dataclass(frozen=True)
class IdentifierVocab:
    """Token ids of the identifiers ``<OBJ000>``.. (index = identifier), ``[SEG]`` and the placeholder."""

    obj_token_ids: tuple
    seg_token_id: int
    placeholder_id: int

    @classmethod
    def from_lm(cls, lm) -> "IdentifierVocab":
        return cls(tuple(lm.obj_token_ids), int(lm.seg_token_id), int(lm.placeholder_id))

    @property
    def num_identifiers(self) -> int:
        return len(self.obj_token_ids)

    def identifier_of_token(self) -> dict:
        return {t: k for k, t in enumerate(self.obj_token_ids)}


class ScenePrompt(NamedTuple):
    """One tokenized sample.

    ==================  =========  ===========================================================================
    ``input_ids``       [L] long   the whole sequence (prefix + query + answer)
    ``labels``          [L] long   ``input_ids`` on the answer, ``IGNORE_INDEX`` elsewhere
    ``placeholder_pos`` [P] long   positions of ``<obj_feat>`` in ``input_ids``, in prompt order
    ``placeholder_obj`` [P] long   local object index spliced at each placeholder
    ``prefix_len``      int        length of the cacheable scene prefix
    ``answer_start``    int        first answer position (== L when there is no answer)
    ``seg_pos``         int        position of ``[SEG]`` in ``input_ids``, -1 when absent
    ``slot_of_object``  [M] long   identifier of each object, -1 for objects left out of the prompt
    ==================  =========  ===========================================================================
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    placeholder_pos: torch.Tensor
    placeholder_obj: torch.Tensor
    prefix_len: int
    answer_start: int
    seg_pos: int
    slot_of_object: torch.Tensor


class ParsedAnswer(NamedTuple):
    identifiers: list  # identifiers named, in order of appearance, duplicates removed
    objects: list  # local object indices they map to (identifiers with no object are left out)
    unknown: list  # identifiers named that no object of this prompt holds
    has_seg: bool


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` maps (wholly or partly) to its unknown token, in order, each
    once. A byte-level BPE (SmolLM2, Qwen, Llama) has none; a word-level vocabulary (the tiny test model) does,
    and a model cannot ground a word it reads as ``[UNK]``: callers warn naming these words."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out: list[str] = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid != unk:
            continue
        w = text[a:b]
        if w and w not in out:
            out.append(w)
    return out


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def keep_largest_objects(num_objects: int, k: int, priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local indices (sorted) of the objects that get identifiers: all when ``num_objects <= k``.

    Above ``k`` the ``k`` objects of highest ``priority [num_objects]`` (the model passes point counts, so the
    largest) are kept, ties broken by lower index; without ``priority`` it raises ``ValueError``.
    """
    if num_objects < 0:
        raise ValueError(f"num_objects must be >= 0, got {num_objects}")
    if num_objects <= k:
        return torch.arange(num_objects)
    if priority is None:
        raise ValueError(f"scene has {num_objects} objects but only {k} identifiers; raise num_obj_tokens or "
                         "use the top-K rule (overflow='topk')")
    if priority.shape != (num_objects,):
        raise ValueError(f"priority must be [{num_objects}], got {tuple(priority.shape)}")
    # stable sort on -priority keeps lower indices first among ties
    order = torch.sort(-priority.double(), stable=True).indices[:k]
    return torch.sort(order).values


#: Temporary old name, imported by models/referring.py until its owner switches to keep_largest_objects.


def identifier_permutation(num_objects: int, k: int, seed: Optional[int] = None) -> torch.Tensor:
    """Identifier ``[num_objects]`` of each object: identity when ``seed is None``, else a seeded random
    choice of distinct identifiers from ``0..k-1``."""
    if num_objects > k:
        raise ValueError(f"{num_objects} objects but only {k} identifiers")
    if seed is None:
        return torch.arange(num_objects)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(k, generator=gen)[:num_objects]


def build_prefix(tokenizer, vocab: IdentifierVocab, slots: torch.Tensor, config: PromptConfig = PromptConfig(),
                 names: Optional[Sequence[Optional[str]]] = None):
    """Prefix ids ``[Lp]`` and, in prompt order, placeholder positions ``[P]`` and the index into ``slots``
    of the object each placeholder holds. ``slots [P]`` are the identifiers of the prompted objects;
    ``names [P]`` (optional) their class names, written after each identifier (None or "": nothing)."""
    slots = torch.as_tensor(slots, dtype=torch.long)
    if names is not None and len(names) != slots.numel():
        raise ValueError(f"names has {len(names)} entries for {slots.numel()} prompted objects")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= vocab.num_identifiers):
        raise ValueError(f"identifiers must lie in [0, {vocab.num_identifiers}), got {slots.tolist()}")
    if len(set(slots.tolist())) != slots.numel():
        raise ValueError(f"identifiers must be distinct, got {slots.tolist()}")
    ids = _tok(tokenizer, config.system)
    order = torch.argsort(slots)  # identifiers in increasing order
    pos, which = [], []
    for i in order.tolist():
        ids.append(vocab.obj_token_ids[int(slots[i])])
        if names is not None and names[i]:
            ids += _tok(tokenizer, " " + str(names[i]).strip())
        pos.append(len(ids))
        which.append(i)
        ids.append(vocab.placeholder_id)
    ids += _tok(tokenizer, config.scene_end)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), torch.tensor(which, dtype=torch.long)


def build_query(tokenizer, text: str, config: PromptConfig = PromptConfig()) -> torch.Tensor:
    """Ids of the question part (question prefix, the referring text, the answer prefix, the query token)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"referring text must be a non-empty string, got {text!r}")
    words = text_token_ids(tokenizer, text, config.max_text_tokens).ids
    ids = _tok(tokenizer, config.question_prefix) + words + _tok(tokenizer, config.answer_prefix)
    if config.query_token:
        tid = tokenizer.convert_tokens_to_ids(config.query_token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"prompt.query_token {config.query_token!r} is not a token of the tokenizer")
        ids.append(int(tid))
    return torch.tensor(ids, dtype=torch.long)


def build_answer(tokenizer, vocab: IdentifierVocab, target_slots: Sequence[int],
                 config: PromptConfig = PromptConfig()) -> torch.Tensor:
    """``<OBJa> <OBJb> ... [SEG]`` (identifiers sorted) or ``none [SEG]`` for zero targets."""
    slots = sorted(set(int(s) for s in target_slots))
    if any(s < 0 or s >= vocab.num_identifiers for s in slots):
        raise ValueError(f"target identifiers must lie in [0, {vocab.num_identifiers}), got {slots}")
    ids = [vocab.obj_token_ids[s] for s in slots] if slots else _tok(tokenizer, config.none_answer)
    return torch.tensor(ids + [vocab.seg_token_id], dtype=torch.long)


def build_prompt(tokenizer, vocab: IdentifierVocab, num_objects: int, text: str,
                 targets: Optional[Sequence[int]] = None, *, seed: Optional[int] = None,
                 keep: Optional[torch.Tensor] = None, config: PromptConfig = PromptConfig(),
                 names: Optional[Sequence[Optional[str]]] = None) -> ScenePrompt:
    """Tokenize one sample.

    ``targets`` are local object indices (``None``: no answer, for inference); ``keep`` the local indices of
    objects that get identifiers (default all; see :func:`keep_largest_objects`); ``seed`` shuffles identifiers
    (``None``: identity). Targets not in ``keep`` cannot be named and are left out of the answer. ``names``
    (optional, one per object) are the class names written into the prefix (:func:`build_prefix`).
    """
    if names is not None and len(names) != num_objects:
        raise ValueError(f"names has {len(names)} entries for {num_objects} objects")
    keep = torch.arange(num_objects) if keep is None else torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= num_objects):
        raise ValueError(f"keep indices must lie in [0, {num_objects}), got {keep.tolist()}")
    slots = identifier_permutation(keep.numel(), vocab.num_identifiers, seed)
    slot_of_object = torch.full((num_objects,), -1, dtype=torch.long)
    slot_of_object[keep] = slots
    prefix, pos, which = build_prefix(tokenizer, vocab, slots, config,
                                      None if names is None else [names[int(k)] for k in keep])
    query = build_query(tokenizer, text, config)
    parts = [prefix, query]
    if targets is not None:
        t = [int(x) for x in targets]
        if any(x < 0 or x >= num_objects for x in t):
            raise ValueError(f"target object indices must lie in [0, {num_objects}), got {t}")
        named = [int(slot_of_object[x]) for x in t if slot_of_object[x] >= 0]
        parts.append(build_answer(tokenizer, vocab, named, config))
    input_ids = torch.cat(parts)
    answer_start = prefix.numel() + query.numel()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[answer_start:] = input_ids[answer_start:]
    seg = (input_ids[answer_start:] == vocab.seg_token_id).nonzero()
    seg_pos = answer_start + int(seg[-1]) if seg.numel() else -1
    return ScenePrompt(input_ids, labels, pos, keep[which], prefix.numel(), answer_start, seg_pos, slot_of_object)


def parse_answer(token_ids: Sequence[int], vocab: IdentifierVocab, slot_of_object: torch.Tensor) -> ParsedAnswer:
    """Identifiers named in generated ``token_ids`` mapped back to local object indices (exact inverse of
    the assignment in :func:`build_prompt`). Tokens after ``[SEG]`` are ignored."""
    id_of = vocab.identifier_of_token()
    object_of_slot = {int(s): j for j, s in enumerate(slot_of_object.tolist()) if s >= 0}
    idents, objects, unknown, has_seg = [], [], [], False
    for t in (int(x) for x in token_ids):
        if t == vocab.seg_token_id:
            has_seg = True
            break
        k = id_of.get(t)
        if k is None or k in idents:
            continue
        idents.append(k)
        if k in object_of_slot:
            objects.append(object_of_slot[k])
        else:
            unknown.append(k)
    return ParsedAnswer(idents, objects, unknown, has_seg)
