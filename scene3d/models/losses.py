"""Losses of the referring segmenter (:class:`scene3d.models.referring.ReferringSegmenter.forward`).

* ``lm``: cross-entropy over the answer's tokens only (identifiers and ``[SEG]``), from logits computed at
  the positions before them (:func:`loss_positions`);
* ``mask_bce`` (mean over points) + ``mask_dice`` (per question, smoothed so zero-target questions push the
  mask to empty: :func:`dice_loss`);
* ``obj``: per-object target BCE where *hard negatives* — objects of a target's class that are not targets
  (when classes are known) and Sr3D ``distractors`` — weigh ``hard_negative_weight`` instead of 1
  (:func:`object_targets`);
* ``obj_rank``: softmax cross-entropy over a question's objects and the "no target" logit (:func:`rank_loss`);
* ``obj_sim``: BCE of the grounding head's object similarity against "same class" (:func:`similarity_loss`);
* ``anchor``: where a row names its anchors, ``-log`` of the attention every other object's anchor head puts
  on them (:func:`anchor_loss`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from scene3d.constants import IGNORE_INDEX
from scene3d.structures.ragged import counts_from_offset


class ReferringLoss(NamedTuple):
    total: torch.Tensor
    lm: torch.Tensor
    mask_bce: torch.Tensor
    mask_dice: torch.Tensor
    obj: torch.Tensor
    obj_rank: torch.Tensor
    obj_sim: torch.Tensor
    anchor: torch.Tensor
    #: object-name alignment (:func:`name_loss`); 0 where no object's class name is known
    obj_name: Optional[torch.Tensor] = None


def loss_positions(labels: torch.Tensor):
    """Positions ``[R, K]`` whose next token carries a label, and those labels ``[R, K]`` (``IGNORE_INDEX``
    where a row has fewer than ``K``; such slots point at position 0). Cross-entropy over the logits at these
    positions equals the usual shifted loss over all positions (with a 49k vocabulary the head over every
    position would cost more than the layers)."""
    nxt = labels[:, 1:]  # (R, L-1)
    has = nxt != IGNORE_INDEX
    k = max(int(has.sum(1).max()), 1) if labels.numel() else 1
    r = labels.shape[0]
    at = labels.new_zeros(r, k)
    target = labels.new_full((r, k), IGNORE_INDEX)
    for i in range(r):
        pos = has[i].nonzero().flatten()
        at[i, : pos.numel()] = pos
        target[i, : pos.numel()] = nxt[i, pos]
    return at, target


def dice_loss(logits: torch.Tensor, target: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Mean over scenes of ``1 - (2|p g| + 1) / (|p| + |g| + 1)`` (smoothing 1: an empty target asks for an
    empty prediction). Computed in float32 (under bf16 autocast the logits arrive in bf16)."""
    p = torch.sigmoid(logits.float())
    target = target.float()
    counts = counts_from_offset(offset).to(logits.device)
    batch = torch.repeat_interleave(torch.arange(len(counts), device=logits.device), counts)
    inter = torch.zeros(len(counts), device=logits.device).index_add(0, batch, p * target)
    ps = torch.zeros(len(counts), device=logits.device).index_add(0, batch, p)
    gs = torch.zeros(len(counts), device=logits.device).index_add(0, batch, target)
    return (1 - (2 * inter + 1) / (ps + gs + 1)).mean()


def rank_loss(obj_logits: torch.Tensor, obj_label: torch.Tensor, obj_offset: torch.Tensor,
              null_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax cross-entropy over a question's objects (the grounding loss of ReferIt3D-style models), mean
    over the questions it covers; 0 when there are none. Per-object BCE alone must put each score above or
    below a fixed threshold; "the chair closest to the desk" is a comparison among the chairs, which a
    softmax over the objects expresses directly.

    Without ``null_logits`` it covers questions with exactly one target. With them (``[B]``, the "no target"
    logit, ``MaskDecoderConfig.null_object``) the softmax runs over the objects and the null and covers every
    question: zero targets -> the null; one or more -> ``-log`` of the probability mass on the targets (the
    marginal likelihood of "one of the targets is the pick")."""
    counts = counts_from_offset(obj_offset).tolist()
    terms = []
    for b, (logits, label) in enumerate(zip(obj_logits.split(counts), obj_label.split(counts))):
        n = int(label.sum()) if label.numel() else 0
        if null_logits is None:
            if n == 1:
                terms.append(F.cross_entropy(logits[None], label.argmax()[None]))
            continue
        z = torch.cat([logits, null_logits[b].reshape(1)])
        pick = torch.cat([label > 0.5, torch.tensor([n == 0], device=label.device)])
        terms.append(torch.logsumexp(z, 0) - torch.logsumexp(z[pick], 0))
    return torch.stack(terms).mean() if terms else obj_logits.sum() * 0.0


def similarity_loss(grounding, tokens, object_class: Optional[torch.Tensor]) -> torch.Tensor:
    """BCE of the grounding head's object-similarity logits against "same class" over the ordered pairs of
    distinct objects of each question's scene, mean over questions with >= 2 objects; 0 without
    ``rank_pairs`` or without ``object_class [M]``."""
    if grounding.sim_embed is None or object_class is None:
        return tokens.feat.sum() * 0.0
    obj = grounding.obj_proj(tokens.feat)
    cls = object_class.to(obj.device)
    terms = []
    for b, m in enumerate(tokens.obj_counts.tolist()):
        o0 = int(tokens.obj_offset[b - 1]) if b else 0
        if m < 2:
            continue
        off = ~torch.eye(m, dtype=torch.bool, device=obj.device)
        same = (cls[o0 : o0 + m, None] == cls[None, o0 : o0 + m]).float()
        terms.append(F.binary_cross_entropy_with_logits(grounding.similarity_logits(obj[o0 : o0 + m])[off],
                                                        same[off]))
    return torch.stack(terms).mean() if terms else obj.sum() * 0.0


def name_loss(obj_embeds: torch.Tensor, names: Sequence[Optional[str]], name_embed, scale: torch.Tensor) -> torch.Tensor:
    """Object-name alignment: cross-entropy of each object's LLM input embedding ``obj_embeds [M, H]`` (the
    projector's output, spliced into the prompt) against the LLM's own embeddings of the class names present
    (``name_embed(names) -> [K, H]``, the mean of each name's token embeddings, frozen), by cosine similarity
    times ``scale``; objects whose name is None are left out. 0 with fewer than two distinct names.

    Chat-3D's object-text alignment, as a side loss on every object of every scene instead of a separate stage:
    the referring rows name a few objects of a scene, this supervises all of them, so an object token of a
    real scan lands near the word a question uses for it ("the television ...")."""
    if len(names) != obj_embeds.shape[0]:
        raise ValueError(f"names has {len(names)} entries for {obj_embeds.shape[0]} objects")
    known = [i for i, n in enumerate(names) if n]
    vocab = sorted({names[i] for i in known})
    if len(vocab) < 2:
        return obj_embeds.sum() * 0.0
    col = {n: j for j, n in enumerate(vocab)}
    target = torch.tensor([col[names[i]] for i in known], dtype=torch.long, device=obj_embeds.device)
    words = F.normalize(name_embed(vocab).to(obj_embeds.device).float().detach(), dim=-1)  # (K, H)
    obj = F.normalize(obj_embeds[known].float(), dim=-1)  # (M', H)
    return F.cross_entropy(scale.float() * obj @ words.T, target)


def anchor_loss(attention: Optional[Sequence[torch.Tensor]], anchor_rows: Sequence[Optional[torch.Tensor]],
                eps: float = 1e-6) -> Optional[torch.Tensor]:
    """Anchor supervision of the grounding head's anchor head (head 0 of each relation layer).

    ``attention[b]`` ``[L, M, M]`` is question ``b``'s attention (row i: where object i looks), ``anchor_rows[b]``
    the local rows of its anchors (None or empty: the row names none). For each such question, every object
    that is not an anchor should look at the anchors: ``-log`` of its attention mass on them, mean over those
    objects and the layers, then over the questions. None when no question names an anchor (or there is no
    attention), so the caller can add nothing.

    Why: "the chair closest to the window" needs every chair to compare its own distance to the window with
    the other chairs'; the pair features hold that rank, but only an object attending to the window reads it.
    Trained on the answer alone, the attention never found the window and the superlatives stayed at chance
    (README, "Anchor supervision"); ReferIt3D-style models add an anchor-prediction loss for the same reason."""
    if attention is None:
        return None
    terms = []
    for att, rows in zip(attention, anchor_rows):
        if rows is None or not rows.numel():
            continue
        m = att.shape[-1]
        rows = rows.to(att.device)
        others = torch.ones(m, dtype=torch.bool, device=att.device)
        others[rows] = False
        if not bool(others.any()):
            continue
        mass = att[:, others][:, :, rows].float().sum(-1)  # (L, M - |A|)
        terms.append(-(mass + eps).log().mean())
    return torch.stack(terms).mean() if terms else None


def local_rows(tokens, b: int, ids: Sequence[int], what: str) -> torch.Tensor:
    """Local object rows (sorted, distinct) of scene ``b`` holding the source object ``ids``."""
    if tokens.object_ids is None:
        raise ValueError("tokens.object_ids is needed to match target / distractor object ids")
    o0 = int(tokens.obj_offset[b - 1]) if b else 0
    scene_ids = tokens.object_ids[o0 : o0 + int(tokens.obj_counts[b])].tolist()
    out = []
    for i in ids:
        if int(i) not in scene_ids:
            raise ValueError(f"sample {b}: {what} object id {i} is not among the scene's object ids")
        out.append(scene_ids.index(int(i)))
    return torch.tensor(sorted(set(out)), dtype=torch.long)


def object_targets(tokens, targets: Sequence, distractors: Optional[Sequence], object_class: Optional[torch.Tensor],
                   hard_negative_weight: float):
    """Point targets ``[N]``, object labels ``[M]`` and object weights ``[M]`` (hard negatives weigh more) of
    question ``b`` on scene ``b`` of ``tokens``."""
    dev = tokens.feat.device
    label = torch.zeros(tokens.num_objects, device=dev)
    weight = torch.ones(tokens.num_objects, device=dev)
    for b in range(tokens.batch_size):
        o0 = int(tokens.obj_offset[b - 1]) if b else 0
        rows = local_rows(tokens, b, targets[b], "target").to(dev) + o0
        hard = torch.zeros(tokens.num_objects, dtype=torch.bool, device=dev)
        if object_class is not None and rows.numel():
            m = int(tokens.obj_counts[b])
            cls = object_class.to(dev)
            hard[o0 : o0 + m] = torch.isin(cls[o0 : o0 + m], cls[rows])
        if distractors is not None and distractors[b]:
            hard[local_rows(tokens, b, distractors[b], "distractor").to(dev) + o0] = True
        weight[hard] = hard_negative_weight
        label[rows] = 1.0
        weight[rows] = 1.0
    gt_point = (label[tokens.point2obj.clamp_min(0)] * (tokens.point2obj >= 0)).float()
    return gt_point, label, weight
